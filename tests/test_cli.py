"""The hf-tdrop command line: prune + shrink + report end to end, --help, bad arguments, fake push."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, tiny_bert, tiny_inputs, tiny_resnet

from hf_tdrop import prune_model
from hf_tdrop.cli import main
from hf_tdrop.shrink import shrink_model

SENTINEL = "hf_SENTINELcliToken0123456789"


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny BERT checkpoint directory (config with architectures, safetensors, tokenizer)."""
    from test_hub import tiny_tokenizer

    path = tmp_path / "ckpt"
    model = tiny_bert().eval()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_shrink_then_report_in_process(checkpoint, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "out"
    code, stdout, _ = run(["prune", checkpoint, "--sparsity", "0.5", "--mode", "unit", "--shrink", "--output", out], capsys)
    assert code == 0
    assert "intermediate_size: 48 -> 24" in stdout and f"Saved to {out}" in stdout
    assert {"model.safetensors", "config.json", "tdrop_config.json", "README.md", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}

    # the same pipeline through the Python API gives the same model
    reference = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    prune_model(reference, 0.5, mode="unit")
    shrink_model(reference, measure_file_size=False)
    shrunk = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert shrunk.config.intermediate_size == 24
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(shrunk(**inputs).logits, reference(**inputs).logits, atol=0, rtol=0)
    meta = json.loads((out / "tdrop_config.json").read_text())
    assert meta["pruning"]["mode"] == "unit" and meta["pruning"]["method"] == "magnitude"
    assert meta["shrink"]["config_changes"] == {"intermediate_size": [48, 24]}
    assert meta["base_model"] is None  # a local directory is not a Hub id

    code, stdout, _ = run(["report", out, "--format", "json"], capsys)
    assert code == 0
    layers = {layer["name"]: layer for layer in json.loads(stdout)["layers"]}
    assert layers["bert.encoder.layer.0.intermediate.dense"]["n_units"] == 24
    assert layers["bert.encoder.layer.0.intermediate.dense"]["zero_units"] == 0
    assert layers["bert.encoder.layer.0.attention.self.query"]["zero_units"] == 16
    assert layers["classifier"]["is_head"] is True and layers["classifier"]["zero_units"] == 0

    code, stdout, _ = run(["report", out], capsys)
    assert code == 0 and "supported layers" in stdout and "| layer" in stdout


def test_console_entry_in_subprocess(checkpoint, tmp_path):
    out = tmp_path / "w30"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "hf_tdrop.cli", "prune", str(checkpoint), "--sparsity", "0.3",
                           "--method", "random", "--seed", "3", "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "tdrop_config.json").read_text())
    assert meta["pruning"]["method"] == "random" and meta["pruning"]["mode"] == "weight"
    # floor(0.3 * 32) = 9 of the 32 weights of every w_o of a 32-input layer are zero
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    zeros = (model.bert.encoder.layer[0].attention.self.query.weight == 0).sum(dim=1)
    assert zeros.tolist() == [9] * 32
    assert (model.classifier.weight != 0).all()


def test_prune_carries_the_saved_training_config_over(checkpoint, tmp_path, capsys, caplog):
    from hf_tdrop import TargetedDropoutConfig

    config = TargetedDropoutConfig(alpha=0.5, gamma=0.25, mode="unit", extra={"schedule": {"kind": "linear"}})
    config.save_pretrained(checkpoint)
    first, second = tmp_path / "first", tmp_path / "second"
    assert run(["prune", checkpoint, "--sparsity", "0.5", "--output", first], capsys)[0] == 0
    meta = json.loads((first / "tdrop_config.json").read_text())
    assert meta["targeted_dropout"] == config.to_dict() and meta["schedule"] == {"kind": "linear"}
    # a saved model without tdrop_training_config.json: the config recorded in its tdrop_config.json
    assert run(["prune", first, "--sparsity", "0.6", "--output", second], capsys)[0] == 0
    assert json.loads((second / "tdrop_config.json").read_text())["targeted_dropout"] == config.to_dict()

    (checkpoint / "tdrop_training_config.json").write_text("{not json")
    code, stdout, _ = run(["prune", checkpoint, "--sparsity", "0.5", "--output", tmp_path / "third"], capsys)
    assert code == 0 and "Saved to" in stdout
    assert "Not recording a training config" in caplog.text and "is not valid JSON" in caplog.text
    assert json.loads((tmp_path / "third" / "tdrop_config.json").read_text())["targeted_dropout"] is None


def test_help_documents_every_flag(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "prune" in out and "report" in out
    code, out, _ = run(["prune", "--help"], capsys)
    assert code == 0
    for flag in ("--sparsity", "--mode", "--n", "--m", "--method", "--target-modules", "--exclude-modules", "--seed", "--shrink",
                 "--on-uneven", "--output", "--overwrite", "--push-to-hub", "--private", "--base-model"):
        assert flag in out
    code, out, _ = run(["report", "--help"], capsys)
    assert code == 0 and "--format" in out and "--target-modules" in out


def test_prune_nm_two_of_four(checkpoint, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from hf_tdrop import check_nm_sparsity

    out = tmp_path / "nm"
    code, stdout, _ = run(["prune", checkpoint, "--mode", "nm", "--n", "2", "--m", "4", "--output", out], capsys)
    assert code == 0 and "magnitude 2:4 pruning" in stdout
    meta = json.loads((out / "tdrop_config.json").read_text())
    assert (meta["pruning"]["mode"], meta["pruning"]["n"], meta["pruning"]["m"]) == ("nm", 2, 4)
    assert meta["pruning"]["nm_check"]["exact"] is True
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert check_nm_sparsity(model).ok
    assert (model.classifier.weight != 0).all()  # heads are left dense by default
    reference = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    prune_model(reference, mode="nm")
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    code, _, _ = run(["prune", checkpoint, "--mode", "nm", "--n", "1", "--m", "4", "--sparsity", "0.5",
                      "--output", tmp_path / "half"], capsys)
    assert code == 0
    half = AutoModelForSequenceClassification.from_pretrained(tmp_path / "half")
    zeros = (half.bert.encoder.layer[0].attention.self.query.weight == 0).sum(dim=1)
    assert zeros.tolist() == [4 * 3] * 32  # floor(0.5 * 8) groups of 4, 3 zeros each


BAD_PRUNE = [
    (["--sparsity", "1.5", "--output", "{out}"], 2, "--sparsity must be in [0, 1)"),
    (["--sparsity", "half", "--output", "{out}"], 2, "expected a number"),
    (["--sparsity", "0.5", "--shrink", "--output", "{out}"], 2, "--shrink needs --mode unit"),
    (["--sparsity", "0.5"], 2, "give --output DIR and/or --push-to-hub"),
    (["--sparsity", "0.5", "--mode", "block", "--output", "{out}"], 2, "invalid choice: 'block'"),
    (["--sparsity", "0.5", "--output", "{out}", "--push-to-hub", "a/b/c"], 2, "not a valid Hub repo id"),
    (["--sparsity", "0.5", "--output", "{out}", "--private"], 2, "--private only applies with --push-to-hub"),
    (["--sparsity", "0.5", "--output", "{out}", "--seed", "-1"], 2, "non-negative integer"),
    (["--sparsity", "0.5", "--output", "{out}", "--target-modules", "nothing_like_this"], 2, "No layer matched"),
    (["--sparsity", "0.5", "--output", "{busy}"], 2, "is not empty; pass --overwrite"),
    (["--output", "{out}"], 2, "--sparsity is required with --mode weight"),
    (["--sparsity", "0.5", "--n", "2", "--output", "{out}"], 2, "--n/--m set the N:M pattern of --mode nm"),
    (["--mode", "nm", "--n", "4", "--m", "4", "--output", "{out}"], 2, "--n (nonzeros kept per group of m=4)"),
    (["--mode", "nm", "--n", "0", "--output", "{out}"], 2, "expected a positive integer"),
    (["--mode", "nm", "--sparsity", "1.5", "--output", "{out}"], 2, "--sparsity (fraction of groups"),
]


@pytest.mark.parametrize("extra,code,message", BAD_PRUNE, ids=[m for _, _, m in BAD_PRUNE])
def test_bad_prune_arguments_exit_nonzero_and_write_nothing(checkpoint, tmp_path, capsys, extra, code, message):
    out, busy = tmp_path / "out", tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    argv = ["prune", checkpoint] + [a.format(out=out, busy=busy) for a in extra]
    got, stdout, stderr = run(argv, capsys)
    assert got == code
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]
    assert not out.exists()
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_bad_model_arguments(tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    resnet = tmp_path / "resnet"
    tiny_resnet().save_pretrained(resnet)
    cases = [
        (["prune", empty, "--sparsity", "0.5", "--output", out], 2, "has no config.json"),
        (["prune", tmp_path / "no" / "such" / "dir", "--sparsity", "0.5", "--output", out], 2, "no such directory"),
        (["prune", "./mm", "--sparsity", "0.5", "--output", out], 2, "MODEL './mm': no such directory"),
        (["report", "~/no-such-model-dir"], 2, "no such directory"),
        (["prune", "a//b", "--sparsity", "0.5", "--output", out], 2, "no such directory"),
        (["prune", "bad id!", "--sparsity", "0.5", "--output", out], 2,
         "neither an existing directory nor a valid Hub model id"),
        (["prune", resnet, "--sparsity", "0.5", "--mode", "unit", "--shrink", "--output", out], 2,
         "does not support model type 'resnet'"),
        (["report", empty], 2, "has no config.json"),
        (["report", resnet, "--format", "yaml"], 2, "invalid choice: 'yaml'"),
        ([], 2, "required"),
    ]
    for argv, code, message in cases:
        got, _, stderr = run(argv, capsys)
        errors = [line for line in stderr.splitlines() if "error:" in line]
        assert got == code, (argv, stderr)
        assert len(errors) == 1 and message in errors[0], (argv, stderr)
        assert not out.exists()


def test_a_hub_id_that_is_not_a_directory_is_looked_up_once(tmp_path, capsys, monkeypatch):
    """A mistyped local directory taken for a Hub id: one lookup, one line, no retries."""
    import time

    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    out = tmp_path / "out"
    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the test session may run offline
    monkeypatch.setattr(HfApi, "model_info", unreachable)
    start = time.perf_counter()
    got, _, stderr = run(["prune", "mm", "--sparsity", "0.5", "--output", out], capsys)
    assert time.perf_counter() - start < 10 and calls == ["mm"]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert got == 1 and len(errors) == 1 and "not a local directory, and the Hub could not be reached" in errors[0]

    def missing(self, repo_id, **kwargs):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its HTTP response is beside the point
        Exception.__init__(error, "404 Repository Not Found")
        raise error

    monkeypatch.setattr(HfApi, "model_info", missing)
    got, _, stderr = run(["report", "someone/no-such-model"], capsys)
    assert got == 2 and "neither a local directory nor a model on the Hub" in stderr
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    got, _, stderr = run(["report", "mm"], capsys)
    assert got == 1 and "HF_HUB_OFFLINE is set" in stderr
    assert not out.exists()


def test_prune_and_push_with_fake_hub(checkpoint, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    uploaded = tmp_path / "uploaded"
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, kwargs))
        shutil.copytree(folder_path, uploaded)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    code, stdout, stderr = run(["prune", checkpoint, "--sparsity", "0.5", "--mode", "unit", "--shrink",
                                "--push-to-hub", "someone/cli-bert", "--private", "--base-model", "google-bert/bert-base-uncased"],
                               capsys)
    assert code == 0, stderr
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"] and calls[0][2]["private"] is True
    assert {"model.safetensors", "config.json", "tdrop_config.json", "README.md"} <= {p.name for p in uploaded.iterdir()}
    assert "base_model: google-bert/bert-base-uncased" in (uploaded / "README.md").read_text()
    for path in uploaded.rglob("*"):
        assert SENTINEL.encode() not in path.read_bytes()
    assert SENTINEL not in stdout + stderr


def test_auto_class_from_architectures_with_automodel_fallback():
    import transformers
    from transformers import GPT2Config, T5Config, ViTConfig

    from hf_tdrop.hub import auto_class_for

    assert auto_class_for(GPT2Config(architectures=["GPT2LMHeadModel"])) is transformers.AutoModelForCausalLM
    assert auto_class_for(T5Config(architectures=["T5ForConditionalGeneration"])) is transformers.AutoModelForSeq2SeqLM
    assert auto_class_for(ViTConfig(architectures=["ViTForImageClassification"])) is \
        transformers.AutoModelForImageClassification
    assert auto_class_for(GPT2Config(architectures=["GPT2Model"])) is transformers.AutoModel
    assert auto_class_for(GPT2Config()) is transformers.AutoModel
    assert auto_class_for(GPT2Config(architectures=["NotAClass"])) is transformers.AutoModel


def test_report_loads_hf_tdrop_model_types_in_a_fresh_process(tmp_path):
    """`hf-tdrop` registers hf_tdrop.models itself: a saved ResNet-32 loads with no manual import."""
    from hf_tdrop.models import CifarResNetForImageClassification, resnet32_config

    model = CifarResNetForImageClassification(resnet32_config(num_labels=10))
    prune_model(model, 0.5, mode="unit")
    model.save_pretrained(tmp_path / "resnet32")
    result = subprocess.run([sys.executable, "-m", "hf_tdrop.cli", "report", str(tmp_path / "resnet32"), "--format", "json"],
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    stem = next(layer for name, layer in layers.items() if not layer["is_head"])
    assert stem["zero_units"] == stem["n_units"] // 2


# ----------------------------------------------------------------------------- targets the model was trained with


@pytest.fixture
def gpt2_mlp_checkpoint(tmp_path):
    """A tiny GPT-2 trained with unit targeted dropout on its MLPs only: the checkpoint and the
    tdrop_training_config.json that TargetedDropoutCallback writes beside it."""
    from conftest import tiny_gpt2

    from hf_tdrop import TargetedDropoutConfig

    path = tmp_path / "gpt2-td"
    model = tiny_gpt2()
    model.config.architectures = ["GPT2LMHeadModel"]
    model.save_pretrained(path)
    TargetedDropoutConfig(alpha=0.9, gamma=0.5, mode="unit", target_modules=r".*\.mlp\..*").save_pretrained(path)
    return path


def test_prune_defaults_to_the_targets_the_model_was_trained_with(gpt2_mlp_checkpoint, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    code, stdout, stderr = run(["prune", gpt2_mlp_checkpoint, "--mode", "unit", "--sparsity", "0.5", "--shrink",
                                "--output", out], capsys)
    assert code == 0, stderr
    assert r"Targets: 4 layers, target_modules ['.*\.mlp\..*'] from tdrop_training_config.json." in stdout
    meta = json.loads((out / "tdrop_config.json").read_text())
    assert meta["targeted_dropout"]["target_modules"] == r".*\.mlp\..*"
    assert meta["pruning"]["target_source"] == "tdrop_training_config.json"
    assert meta["pruning"]["target_modules"] == [r".*\.mlp\..*"]
    assert meta["pruning"]["layers"] == [f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")]
    # attention's Q/K/V units are untouched; the MLPs are shrunk to half their width
    original = AutoModelForCausalLM.from_pretrained(gpt2_mlp_checkpoint)
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(saved.transformer.h[0].attn.c_attn.weight, original.transformer.h[0].attn.c_attn.weight)
    assert saved.config.n_inner == 64  # 4 * 32 units, half removed

    # an explicit --target-modules wins, and says so
    code, stdout, _ = run(["prune", gpt2_mlp_checkpoint, "--mode", "unit", "--sparsity", "0.5", "--target-modules",
                           "c_attn", "--output", tmp_path / "attn"], capsys)
    assert code == 0 and "target_modules ['c_attn'] from argument" in stdout
    meta = json.loads((tmp_path / "attn" / "tdrop_config.json").read_text())
    assert meta["pruning"]["target_source"] == "argument"
    assert meta["pruning"]["layers"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    # --exclude-modules adds to the recorded targets' exclusions
    code, stdout, _ = run(["prune", gpt2_mlp_checkpoint, "--mode", "unit", "--sparsity", "0.5", "--exclude-modules",
                           "c_proj", "--output", tmp_path / "fc"], capsys)
    assert code == 0 and "exclude_modules ['c_proj']" in stdout
    assert json.loads((tmp_path / "fc" / "tdrop_config.json").read_text())["pruning"]["layers"] == [
        "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]


def test_without_a_training_config_the_default_selection_is_used_and_named(checkpoint, tmp_path, capsys):
    code, stdout, _ = run(["prune", checkpoint, "--sparsity", "0.5", "--output", tmp_path / "o"], capsys)
    assert code == 0 and "Targets: 13 layers, default selection." in stdout
    assert json.loads((tmp_path / "o" / "tdrop_config.json").read_text())["pruning"]["target_source"] == \
        "default selection"


# ----------------------------------------------------------------------------- learned criteria from the shell


def _l0_bert(patched_only=False):
    from hf_tdrop import L0Config, finalize_model, patch_model

    torch.manual_seed(0)
    model = tiny_bert().eval()
    model.config.architectures = ["BertForSequenceClassification"]
    config = L0Config(dataset_size=10, mode="unit", target_modules="intermediate.dense")
    patch_model(model, config=config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("l0_log_alpha"):
                p.copy_(torch.randn_like(p) * 3)
    if not patched_only:
        finalize_model(model)
    return model, config


def _reference_gates(model, sparsity=0.5):
    """What the Python API gives: finalised model, pruned by its gates."""
    reference = copy.deepcopy(model)
    prune_model(reference, sparsity, mode="unit", method="gates")
    return reference.state_dict()


def _assert_saved_equals(out, state):
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    for key, value in state.items():
        if not key.endswith("l0_log_alpha"):
            assert torch.equal(saved[key], value), key


def test_method_gates_reads_the_scores_save_pruned_wrote(tmp_path, capsys):
    from hf_tdrop import save_pruned

    model, _ = _l0_bert()
    save_pruned(model, tmp_path / "trained")
    assert (tmp_path / "trained" / "tdrop_criteria.safetensors").is_file()
    code, stdout, stderr = run(["prune", tmp_path / "trained", "--method", "gates", "--mode", "unit", "--sparsity",
                                "0.5", "--output", tmp_path / "out"], capsys)
    assert code == 0, stderr
    assert "Targets: 2 layers, layers with learned scores." in stdout
    _assert_saved_equals(tmp_path / "out", _reference_gates(model))
    # the pruned model carries its scores on, so it can be pruned by them again
    assert (tmp_path / "out" / "tdrop_criteria.safetensors").is_file()


def test_method_gates_reads_the_older_learned_criterion_file(tmp_path, capsys):
    model, _ = _l0_bert()
    model.save_pretrained(tmp_path / "run")
    torch.save({name: {"name": m.tdrop_criterion.name, "granularity": m.tdrop_criterion.granularity,
                       "scores": m.tdrop_criterion.scores} for name, m in model.named_modules()
                if hasattr(m, "tdrop_criterion")}, tmp_path / "run" / "learned_criterion.pt")
    code, _, stderr = run(["prune", tmp_path / "run", "--method", "gates", "--mode", "unit", "--sparsity", "0.5",
                           "--output", tmp_path / "out"], capsys)
    assert code == 0, stderr
    _assert_saved_equals(tmp_path / "out", _reference_gates(model))


def test_method_gates_on_a_checkpoint_saved_while_patched(tmp_path, capsys, caplog):
    """A Trainer checkpoint of an L0 run: the weights hold l0_log_alpha; with the method's
    tdrop_training_config.json the command folds the gates in and prunes by them."""
    from hf_tdrop import finalize_model

    model, config = _l0_bert(patched_only=True)
    model.save_pretrained(tmp_path / "ckpt")
    finalized = finalize_model(copy.deepcopy(model))

    # without the config: one line saying what to write, nothing written
    code, _, stderr = run(["prune", tmp_path / "ckpt", "--method", "gates", "--mode", "unit", "--sparsity", "0.5",
                           "--output", tmp_path / "out"], capsys)
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and not (tmp_path / "out").exists()
    assert "'l0_log_alpha' tensors of the 'l0' training method" in errors[0]
    assert "python -c \"import hf_tdrop; hf_tdrop.method_config('l0', ...).save_pretrained(" in errors[0]
    # magnitude pruning still works on it, with a warning that the gates are not folded in
    code, _, _ = run(["prune", tmp_path / "ckpt", "--sparsity", "0.5", "--output", tmp_path / "raw"], capsys)
    assert code == 0 and "without the method's effect folded in" in caplog.text

    config.save_pretrained(tmp_path / "ckpt")
    code, stdout, stderr = run(["prune", tmp_path / "ckpt", "--method", "gates", "--mode", "unit", "--sparsity",
                                "0.5", "--output", tmp_path / "out"], capsys)
    assert code == 0, stderr
    assert "target_modules ['intermediate.dense'] from tdrop_training_config.json" in stdout
    _assert_saved_equals(tmp_path / "out", _reference_gates(finalized))
    # with the config, magnitude pruning also starts from the model as trained (gates folded in)
    code, _, _ = run(["prune", tmp_path / "ckpt", "--sparsity", "0.5", "--output", tmp_path / "mag"], capsys)
    assert code == 0
    reference = copy.deepcopy(finalized)
    prune_model(reference, 0.5, target_modules="intermediate.dense")
    _assert_saved_equals(tmp_path / "mag", reference.state_dict())


def test_method_gates_without_scores_tells_a_shell_user_what_to_run(checkpoint, tmp_path, capsys):
    code, _, stderr = run(["prune", checkpoint, "--method", "gates", "--sparsity", "0.5", "--output",
                           tmp_path / "out"], capsys)
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and not (tmp_path / "out").exists()
    assert "--method gates needs the learned l0 scores" in errors[0]
    assert "no tdrop_criteria.safetensors" in errors[0]
    assert f"hf_tdrop.save_learned_criteria(model, '{checkpoint}')" in errors[0]


# ----------------------------------------------------------------------------- start-up time


def test_parser_and_argument_errors_import_neither_torch_nor_transformers(tmp_path):
    """`hf-tdrop --help` and bad arguments answer without loading torch / transformers (seconds)."""
    code = (
        "import sys, contextlib, io\n"
        "from hf_tdrop.cli import build_parser, main\n"
        "build_parser()\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:\n"
        "    codes = [main(['--help']), main(['prune', '--help']), main(['prune', '--bad']),\n"
        f"             main(['prune', {str(tmp_path)!r}, '--sparsity', '1.5', '--output', 'o']),\n"
        f"             main(['prune', {str(tmp_path)!r}, '--sparsity', '0.5'])]\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors', 'huggingface_hub') if m in sys.modules)\n"
        "print(codes, heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[0, 0, 2, 2, 2] []"
