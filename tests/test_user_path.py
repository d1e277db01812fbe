"""The path a user takes: train with the Trainer callbacks, save, then prune from the shell. What is
trained is what gets pruned and what gets recorded (targets, α/γ, learned scores)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from conftest import tiny_bert, tiny_gpt2
from hf_tdrop import (
    L0Config,
    RegularizationCallback,
    TargetedDropoutCallback,
    TargetedDropoutConfig,
    TargetingSchedule,
    TargetingScheduler,
    patch_model,
)
from hf_tdrop.cli import main


def training_args(output_dir, **kwargs):
    defaults = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                    logging_steps=1, save_strategy="no", seed=0, learning_rate=1e-3, disable_tqdm=True,
                    dataloader_num_workers=0)
    return TrainingArguments(**{**defaults, **kwargs})


def token_data(n=16, seq=8, labels="tokens"):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (n, seq), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(),
                              "labels": ids.tolist() if labels == "tokens" else (ids[:, 0] % 3).tolist()})


def cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_gpt2_trained_on_its_mlps_is_pruned_and_recorded_on_its_mlps_only(tmp_path, capsys):
    """Train GPT-2 with unit targeted dropout on `.*\\.mlp\\..*` (Trainer + callback), save, then
    `hf-tdrop prune DIR --mode unit --sparsity 0.5 --shrink`: attention is untouched, the record's
    targets and pruned layers agree, and α/γ are the schedule's."""
    from transformers import AutoModelForCausalLM

    model = tiny_gpt2()
    schedule = TargetingSchedule(alpha=0.9, gamma=0.5, kind="linear", ramp_steps=2)
    config = TargetedDropoutConfig(alpha=0.9, gamma=0.5, mode="unit", target_modules=r".*\.mlp\..*")
    run_dir = tmp_path / "run"
    trainer = Trainer(model=model, args=training_args(run_dir, max_steps=3), train_dataset=token_data())
    TargetedDropoutCallback(schedule, config=config).attach(trainer)
    trainer.train()
    trainer.save_model(str(run_dir))
    assert json.loads((run_dir / "tdrop_training_config.json").read_text())["target_modules"] == r".*\.mlp\..*"
    trained = AutoModelForCausalLM.from_pretrained(run_dir)

    out = tmp_path / "pruned"
    code, stdout, stderr = cli(["prune", run_dir, "--mode", "unit", "--sparsity", "0.5", "--shrink", "--output", out],
                               capsys)
    assert code == 0, stderr
    assert "from tdrop_training_config.json" in stdout
    meta = json.loads((out / "tdrop_config.json").read_text())
    assert meta["pruning"]["layers"] == [f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")]
    assert meta["targeted_dropout"]["target_modules"] == r".*\.mlp\..*"
    assert (meta["targeted_dropout"]["alpha"], meta["targeted_dropout"]["gamma"]) == (0.9, 0.5)
    assert meta["schedule"]["alpha"] == 0.9
    pruned = AutoModelForCausalLM.from_pretrained(out)
    for i in range(2):
        assert torch.equal(pruned.transformer.h[i].attn.c_attn.weight, trained.transformer.h[i].attn.c_attn.weight)
    assert pruned.transformer.h[0].mlp.c_fc.weight.shape == (32, 64)  # 128 units, half removed


def test_conflicting_alpha_gamma_are_refused_before_training():
    with pytest.raises(ValueError, match="the schedule sets alpha/gamma during training"):
        TargetedDropoutCallback(TargetingSchedule(alpha=0.9, gamma=0.9, kind="constant"),
                                config=TargetedDropoutConfig(alpha=0.3, gamma=0.3))


def test_accelerate_style_scheduler_records_what_it_applies(caplog):
    model = patch_model(tiny_bert(), alpha=0.3, gamma=0.3)
    with caplog.at_level(logging.WARNING, logger="hf_tdrop"):
        scheduler = TargetingScheduler(model, TargetingSchedule(alpha=0.9, gamma=0.6, kind="linear", ramp_steps=2))
        scheduler.step()
        scheduler.step()
    warnings = [r.getMessage() for r in caplog.records if "was patched with alpha=0.3" in r.getMessage()]
    assert len(warnings) == 1
    assert (model.tdrop_config.alpha, model.tdrop_config.gamma) == (0.9, 0.6)


def test_l0_checkpoint_from_the_trainer_prunes_by_its_gates_from_the_shell(tmp_path, capsys):
    """An L0 run's Trainer checkpoint (saved while patched: weights + l0_log_alpha + the config the
    RegularizationCallback writes) prunes with `--method gates`, like the Python API does."""
    import copy

    from transformers import AutoModelForSequenceClassification

    from hf_tdrop import finalize_model, prune_model

    torch.manual_seed(0)
    model = tiny_bert()
    model.config.architectures = ["BertForSequenceClassification"]
    patch_model(model, config=L0Config(dataset_size=16, mode="unit", target_modules="intermediate.dense"))
    run_dir = tmp_path / "run"
    trainer = Trainer(model=model, args=training_args(run_dir, max_steps=2, save_strategy="steps", save_steps=2),
                      train_dataset=token_data(labels="class"), callbacks=[RegularizationCallback()])
    trainer.train()
    checkpoint = run_dir / "checkpoint-2"
    assert json.loads((checkpoint / "tdrop_training_config.json").read_text())["method"] == "l0"

    code, _, stderr = cli(["prune", checkpoint, "--method", "gates", "--mode", "unit", "--sparsity", "0.5",
                           "--output", tmp_path / "out"], capsys)
    assert code == 0, stderr
    reference = finalize_model(copy.deepcopy(model))
    prune_model(reference, 0.5, mode="unit", method="gates")
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(saved[key], value), key
