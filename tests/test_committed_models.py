"""The committed result models and the config files of the earlier version keep loading and
computing the same.

Expected values are those the package computed for the committed models with its earlier layer
classes: the first logits of each model on a fixed input, and for ``prune_model(model, 0.5,
mode=...)`` the logits and a SHA-256 digest of the zero pattern of every weight matrix (the pruning
masks)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import hf_tdrop.models  # noqa: F401 - registers tdrop_cifar_resnet with the Auto classes
from hf_tdrop import prune_model

ROOT = Path(__file__).resolve().parent.parent / "results"
CIFAR = ROOT / "image_classification" / "cifar10-cpu" / "models"
M30K = ROOT / "wmt_en_de" / "m30k" / "models" / "td75"

EXPECTED = {
    "none": {
        "logits": [
            -0.472926,
            -1.08566,
            2.401655,
            -0.067561,
            0.547723,
            -1.660667
        ],
        "weight_logits": [
            -0.631155,
            -1.065443,
            1.338837,
            -0.386902,
            1.430145,
            -1.276809
        ],
        "weight_digest": "2718e5e5dbcec4fef82aa6cd49252c31adfd24402a4e81b65f2a88f5f053312d",
        "weight_zeros": 135120,
        "unit_logits": [
            -0.326006,
            0.252228,
            -0.781344,
            -0.552002,
            1.434866,
            -1.025016
        ],
        "unit_digest": "407764dc3b56da6916f3a499b70b9e10c752b21ea0d3308726a264ade5988652",
        "unit_zeros": 135128
    },
    "weight-a0.75-g0.9": {
        "logits": [
            -1.321186,
            -0.822496,
            1.701447,
            0.21698,
            1.17117,
            -1.301081
        ],
        "weight_logits": [
            -1.391916,
            -1.037167,
            2.245047,
            0.457912,
            1.361182,
            -1.481521
        ],
        "weight_digest": "e3d4e97b8c09a8235a6216b7802e94cecac1f676454801b4cbc707612d846dc2",
        "weight_zeros": 135120,
        "unit_logits": [
            -0.343609,
            -0.722123,
            0.422915,
            -0.228056,
            -0.0843,
            -0.395661
        ],
        "unit_digest": "bafdab16e35eb00f6952033c79034aa4bc64e88362bfb21c8ccf3a395e59f786",
        "unit_zeros": 135128
    },
    "unit-a0.9-g0.75": {
        "logits": [
            -1.529682,
            0.219345,
            -0.312053,
            -1.466772,
            0.06695,
            -2.095894
        ],
        "weight_logits": [
            -0.825397,
            -1.198396,
            0.597435,
            -0.780526,
            0.459325,
            -1.739256
        ],
        "weight_digest": "de46ad114f723654d06d8aa0a2ca9e58d957aee5068f368592d8874384ae4ce7",
        "weight_zeros": 135120,
        "unit_logits": [
            -1.634089,
            -1.039691,
            0.596501,
            -0.56376,
            1.714698,
            -1.635747
        ],
        "unit_digest": "ed0f30cb321eacc57e4854ac1376aa51291e2bf2397faac7a9bbe82fbeab3d71",
        "unit_zeros": 135128
    },
    "m30k-td75": {
        "logits": [
            0.063217,
            1.607653,
            0.062661,
            0.19143,
            2.760712,
            1.862886
        ],
        "weight_logits": [
            -0.143212,
            1.298887,
            -0.143503,
            -0.002629,
            2.623494,
            1.679183
        ],
        "weight_digest": "12401455a25bcd4bc7e939057c509035f782e292f1418d77bbad1fdcabeb670a",
        "weight_zeros": 1548480,
        "unit_logits": [
            -0.582045,
            1.196129,
            -0.581626,
            -0.987336,
            -0.021752,
            -0.21105
        ],
        "unit_digest": "3df3aac3c6ca1e5002e2a3cc31de42b1436a5e30bd3a0007ce114be7699fa670",
        "unit_zeros": 1548481
    }
}


def _zero_digest(model) -> tuple[str, int]:
    digest, zeros = hashlib.sha256(), 0
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            zero = param.detach() == 0
            digest.update(name.encode())
            digest.update(zero.numpy().tobytes())
            zeros += int(zero.sum())
    return digest.hexdigest(), zeros


def _check(expected: dict, key: str, logits: torch.Tensor) -> None:
    torch.testing.assert_close(logits.flatten()[:6], torch.tensor(expected[key]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["none", "weight-a0.75-g0.9", "unit-a0.9-g0.75"])
def test_committed_cifar10_models_load_evaluate_and_prune_as_before(name):
    from transformers import AutoModelForImageClassification

    path = CIFAR / name
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path} is not in this checkout")
    expected = EXPECTED[name]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = AutoModelForImageClassification.from_pretrained(path).eval()
    with torch.no_grad():
        _check(expected, "logits", model(pixel_values=x).logits)
    for mode in ("weight", "unit"):
        model = AutoModelForImageClassification.from_pretrained(path).eval()
        prune_model(model, 0.5, mode=mode)
        assert _zero_digest(model) == (expected[f"{mode}_digest"], expected[f"{mode}_zeros"]), mode
        with torch.no_grad():
            _check(expected, f"{mode}_logits", model(pixel_values=x).logits)


def test_committed_multi30k_model_loads_evaluates_and_prunes_as_before():
    """The committed Multi30K translation model (8 MB, float16 weights, evaluated in float32)."""
    from transformers import AutoModelForSeq2SeqLM

    if not (M30K / "model.safetensors").is_file():
        pytest.skip(f"{M30K} is not in this checkout")
    expected = EXPECTED["m30k-td75"]
    ids = torch.tensor([[5, 17, 42, 99, 250, 1], [7, 8, 9, 10, 1, 0]])
    batch = dict(input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=torch.tensor([[0, 11, 12, 13],
                                                                                                  [0, 21, 22, 23]]))
    model = AutoModelForSeq2SeqLM.from_pretrained(M30K).float().eval()
    with torch.no_grad():
        _check(expected, "logits", model(**batch).logits[:, :, :8])
    for mode in ("weight", "unit"):
        model = AutoModelForSeq2SeqLM.from_pretrained(M30K).float().eval()
        prune_model(model, 0.5, mode=mode)
        assert _zero_digest(model) == (expected[f"{mode}_digest"], expected[f"{mode}_zeros"]), mode
        with torch.no_grad():
            _check(expected, f"{mode}_logits", model(**batch).logits[:, :, :8])


OLD_TD_CONFIG = """{
  "alpha": 0.66, "drop_targeted_at_eval": false, "exclude_modules": null,
  "extra": {"schedule": {"kind": "linear", "ramp_steps": 100}}, "gamma": 0.75, "m": 4, "mode": "unit",
  "n": 2, "refresh_every": 1, "rescale": false, "target_modules": ["intermediate.dense"]
}"""
"""``tdrop_training_config.json`` as the earlier version wrote it (no ``"method"`` key)."""
OLD_L0_CONFIG = """{
  "beta": 0.6666666666666666, "dataset_size": 100, "exclude_modules": null, "extra": {}, "gamma": -0.1,
  "init_drop_rate": 0.5, "l0": 0.001, "method": "l0", "mode": "unit", "target_modules": null, "zeta": 1.1
}"""


def test_training_configs_written_by_the_earlier_version_read_back(tmp_path):
    import json

    from hf_tdrop import L0Config, MethodConfig, TargetedDropoutConfig, config_from_dict

    (tmp_path / "td").mkdir()
    (tmp_path / "td" / "tdrop_training_config.json").write_text(OLD_TD_CONFIG)
    td = TargetedDropoutConfig.from_pretrained(tmp_path / "td")
    assert td == TargetedDropoutConfig(alpha=0.66, gamma=0.75, mode="unit", target_modules=["intermediate.dense"],
                                       extra={"schedule": {"kind": "linear", "ramp_steps": 100}})
    assert config_from_dict(json.loads(OLD_TD_CONFIG)) == td == MethodConfig.from_dict(json.loads(OLD_TD_CONFIG))
    assert td.to_dict() == json.loads(OLD_TD_CONFIG)  # written back in the same format
    # save_pruned's record: the training config under "targeted_dropout"
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "tdrop_config.json").write_text(
        json.dumps({"format": "hf-tdrop", "targeted_dropout": json.loads(OLD_TD_CONFIG)}))
    assert TargetedDropoutConfig.from_pretrained(tmp_path / "pruned") == td
    l0 = config_from_dict(json.loads(OLD_L0_CONFIG))
    assert l0 == L0Config(dataset_size=100, mode="unit") and l0.to_dict() == json.loads(OLD_L0_CONFIG)
