"""TargetedDropoutCallback in real (tiny, CPU) Trainer / Seq2SeqTrainer runs: the α/γ applied at
every forward pass and logged at every step follow the schedule (epochs, max_steps, gradient
accumulation, ramp_fraction), patching from a config, log placement, and misuse errors/warnings."""

import logging
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainerCallback, TrainingArguments

from conftest import tiny_bert, tiny_t5
from hf_tdrop import (
    TargetedDropoutCallback,
    TargetedDropoutConfig,
    TargetingSchedule,
    get_targeting,
    is_patched,
    patch_model,
    targeted_layers,
)


def classification_data(n=32, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({
        "input_ids": torch.randint(3, 99, (n, seq), generator=g).tolist(),
        "labels": torch.randint(0, 3, (n,), generator=g).tolist(),
    })


def training_args(tmp_path, cls=TrainingArguments, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
        logging_steps=1, save_strategy="no", seed=0, data_seed=0, learning_rate=1e-3, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    defaults.update(kwargs)
    return cls(**defaults)


def record_forwards(trainer):
    """Every training forward pass: (global_step, α, γ) read from the patched layers."""
    seen = []

    def hook(module, args, kwargs):
        if module.training:
            t = get_targeting(module)
            seen.append((trainer.state.global_step, t["alpha"], t["gamma"]))

    trainer.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def logged(trainer):
    """{step: (tdrop_alpha, tdrop_gamma)} of the training log entries."""
    return {e["step"]: (e["tdrop_alpha"], e["tdrop_gamma"]) for e in trainer.state.log_history if "loss" in e}


def flat(rows):
    """Nested tuples flattened, for pytest.approx (which does not compare nested sequences)."""
    return [x for row in rows for x in row]


def expected(schedule, steps):
    return [(s, schedule.alpha_at(s), schedule.gamma_at(s)) for s in steps]


def test_trainer_epochs_and_ramp_fraction(tmp_path):
    """2 epochs x 8 updates; ramp_fraction=0.5 resolves to 8 steps from state.max_steps = 16."""
    model = patch_model(tiny_bert(), alpha=0.66, gamma=0.75)
    schedule = TargetingSchedule(alpha=0.66, gamma=0.75, kind="linear", ramp_fraction=0.5, delay_steps=2)
    callback = TargetedDropoutCallback(schedule)
    trainer = Trainer(model=model, args=training_args(tmp_path, num_train_epochs=2),
                      train_dataset=classification_data(), callbacks=[callback])
    seen = record_forwards(trainer)
    trainer.train()
    resolved = callback.resolved_schedule
    assert trainer.state.max_steps == 16 and resolved.ramp_steps == 8 and resolved.target_step == 10
    # one forward per update; update k (k updates done before it) ran with schedule.at(k)
    assert flat(seen) == pytest.approx(flat(expected(resolved, range(16))))
    # the log entry at step s reports the values of the update just finished: at(s - 1)
    log = logged(trainer)
    assert sorted(log) == list(range(1, 17))
    assert [(s, *log[s]) for s in range(1, 17)] == [(s, *expected(resolved, [s - 1])[0][1:]) for s in range(1, 17)]
    assert log[1] == (0.0, 0.0) and log[16] == (0.66, 0.75)
    assert len({log[s] for s in range(3, 12)}) == 9  # really ramping, one value per step
    # after training: the values for the next update (here the targets), in every layer
    assert {(v["alpha"], v["gamma"]) for v in targeted_layers(model).values()} == {(0.66, 0.75)}
    assert model.tdrop_config.extra["schedule"] == resolved.to_dict()


def test_trainer_gradient_accumulation_and_max_steps(tmp_path):
    """GA=2: α/γ change once per optimizer update, both micro-batches of an update see the same."""
    model = patch_model(tiny_bert(), alpha=0.99, gamma=0.99, mode="unit")
    schedule = TargetingSchedule(alpha=0.99, gamma=0.99, kind="piecewise", ramp_steps=3)  # targets at 6
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=8, gradient_accumulation_steps=2,
                                                      per_device_train_batch_size=2),
                      train_dataset=classification_data(), callbacks=[TargetedDropoutCallback(schedule)])
    seen = record_forwards(trainer)
    trainer.train()
    assert trainer.state.global_step == 8
    assert len(seen) == 16
    assert flat(seen) == pytest.approx(flat(x for s in range(8) for x in expected(schedule, [s]) * 2))
    log = logged(trainer)
    assert [log[s] for s in range(1, 9)] == [(schedule.alpha_at(s - 1), schedule.gamma_at(s - 1)) for s in range(1, 9)]
    assert log[4] == pytest.approx((0.99 * 3 / 6, 0.99 * (0.95 + 0.05 * 0 / 3)))  # update 3 = N: γ at 95 %
    assert get_targeting(model) == {"alpha": 0.99, "gamma": 0.99, "mode": "unit"}


def test_seq2seq_trainer_and_patching_from_config(tmp_path):
    """Seq2SeqTrainer + a callback that patches the (unpatched) model itself at train start."""
    model = tiny_t5()
    g = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"input_ids": torch.randint(3, 99, (8, 7), generator=g).tolist(),
                              "labels": torch.randint(3, 99, (8, 5), generator=g).tolist()})
    config = TargetedDropoutConfig(alpha=0.5, gamma=0.5, mode="weight", target_modules=["wi", "wo"])
    schedule = TargetingSchedule(alpha=0.5, gamma=0.5, kind="cosine", ramp_steps=2)
    trainer = Seq2SeqTrainer(model=model, args=training_args(tmp_path, Seq2SeqTrainingArguments, max_steps=4,
                                                             per_device_train_batch_size=2),
                             train_dataset=data, callbacks=[TargetedDropoutCallback(schedule, config=config)])
    assert not is_patched(model)
    trainer.train()
    layers = targeted_layers(model)
    assert len(layers) == 8 and all(n.endswith((".wi", ".wo")) for n in layers)  # 2 enc + 2 dec blocks
    assert model.tdrop_config is config and config.extra["schedule"] == schedule.to_dict()
    log = logged(trainer)
    assert flat(log[s] for s in (1, 2, 3, 4)) == pytest.approx([0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.5, 0.5])
    # a second train() on the same trainer: already patched with this very config -> accepted
    trainer.train()
    # but a model patched with other settings is an error, not silently re-targeted
    other = patch_model(tiny_t5(), alpha=0.1, gamma=0.1)
    bad = Seq2SeqTrainer(model=other, args=training_args(tmp_path, Seq2SeqTrainingArguments, max_steps=1),
                         train_dataset=data, callbacks=[TargetedDropoutCallback(schedule, config=config)])
    with pytest.raises(ValueError, match="already patched with different settings"):
        bad.train()


def test_unpatched_model_is_a_clear_error(tmp_path):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=classification_data(),
                      callbacks=[TargetedDropoutCallback(TargetingSchedule(0.5, 0.5, ramp_steps=2))])
    with pytest.raises(ValueError, match=r"model \(BertForSequenceClassification\) is not patched.*patch_model"):
        trainer.train()
    assert trainer.state.global_step == 0 and not is_patched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_schedule_longer_than_training_warns(tmp_path, caplog):
    model = patch_model(tiny_bert(), alpha=0.9, gamma=0.8)
    schedule = TargetingSchedule(alpha=0.9, gamma=0.8, kind="linear", ramp_steps=20)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=5), train_dataset=classification_data(),
                      callbacks=[TargetedDropoutCallback(schedule)])
    with caplog.at_level(logging.WARNING, logger="hf_tdrop.schedules"):
        trainer.train()
    msgs = [r.getMessage() for r in caplog.records if r.name == "hf_tdrop.schedules"]
    assert len(msgs) == 1
    assert "only at step 20" in msgs[0] and "training has 5 steps" in msgs[0] and "never be reached" in msgs[0]
    assert "alpha=0.18, gamma=0.16" in msgs[0]  # the last update (k = 4) uses 4/20 of the targets
    assert logged(trainer)[5] == pytest.approx((0.18, 0.16))


class KeyRecorder(TrainerCallback):
    """Stands in for a report_to integration: records the keys of each training log it receives."""

    def __init__(self):
        self.keys = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.keys.append(set(logs))


def test_attach_puts_callback_ahead_of_reporters(tmp_path):
    schedule = TargetingSchedule(alpha=0.5, gamma=0.5, kind="linear", ramp_steps=2)
    # callbacks=[reporter, ours]: the reporter (like report_to integrations) runs first, misses the keys
    late, reporter = TargetedDropoutCallback(schedule), KeyRecorder()
    trainer = Trainer(model=patch_model(tiny_bert(), alpha=0.5, gamma=0.5),
                      args=training_args(tmp_path, max_steps=2), train_dataset=classification_data(),
                      callbacks=[reporter, late])
    trainer.train()
    assert len(reporter.keys) == 2 and not any("tdrop_alpha" in k for k in reporter.keys)
    assert set(logged(trainer)) == {1, 2}  # log_history still has them
    # attach(): first in the handler, so every later callback receives tdrop_alpha / tdrop_gamma
    early, reporter = TargetedDropoutCallback(schedule), KeyRecorder()
    trainer = Trainer(model=patch_model(tiny_bert(), alpha=0.5, gamma=0.5),
                      args=training_args(tmp_path, max_steps=2), train_dataset=classification_data(),
                      callbacks=[reporter])
    assert early.attach(trainer) is early and trainer.callback_handler.callbacks[0] is early
    early.attach(trainer)  # idempotent: not added twice
    assert sum(cb is early for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    assert len(reporter.keys) == 2 and all({"tdrop_alpha", "tdrop_gamma"} <= k for k in reporter.keys)
    assert logged(trainer) == {1: (0.0, 0.0), 2: (0.25, 0.25)}  # linear: exact


def test_report_to_without_attach_warns(caplog):
    model = patch_model(tiny_bert(), alpha=0.5, gamma=0.5)
    callback = TargetedDropoutCallback(TargetingSchedule(0.5, 0.5, ramp_steps=4))
    state = SimpleNamespace(max_steps=10, global_step=3)
    with caplog.at_level(logging.WARNING, logger="hf_tdrop.callback"):
        callback.on_train_begin(SimpleNamespace(report_to=["tensorboard"]), state, None, model=model)
    assert "will not receive tdrop_alpha/tdrop_gamma" in caplog.text and ".attach(trainer)" in caplog.text
    assert get_targeting(model) == {"alpha": 0.75 * 0.5, "gamma": 0.75 * 0.5, "mode": "weight"}  # at(3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_tdrop.callback"):
        callback.on_train_begin(SimpleNamespace(report_to=[]), state, None, model=model)
    assert not caplog.records


def test_callback_argument_validation():
    s = TargetingSchedule(0.5, 0.5, ramp_steps=2)
    with pytest.raises(ValueError, match="`schedule` must be a TargetingSchedule, got float"):
        TargetedDropoutCallback(0.5)
    with pytest.raises(ValueError, match="`config` must be a TargetedDropoutConfig or None, got dict"):
        TargetedDropoutCallback(s, config={"alpha": 0.5, "gamma": 0.5})
    with pytest.raises(ValueError, match="`log_values` must be True or False"):
        TargetedDropoutCallback(s, log_values="yes")


def test_config_and_schedule_with_different_targets_is_refused_at_once():
    """α/γ given twice: the config at 0.3 and the schedule at 0.9 would train at 0.9 and record 0.3."""
    schedule = TargetingSchedule(alpha=0.9, gamma=0.9, kind="linear", ramp_steps=2)
    with pytest.raises(ValueError) as err:
        TargetedDropoutCallback(schedule, config=TargetedDropoutConfig(alpha=0.3, gamma=0.3))
    message = str(err.value)
    assert "\n" not in message
    assert "alpha=0.3, gamma=0.3" in message and "alpha=0.9, gamma=0.9" in message and "schedule" in message
    with pytest.raises(ValueError, match="`save_config` must be True or False"):
        TargetedDropoutCallback(schedule, save_config=1)


def test_recorded_config_follows_the_schedule_and_is_saved_with_the_checkpoints(tmp_path, caplog):
    """A model patched at α=γ=0.3 and trained by a schedule to 0.9/0.8: one warning; the config the
    model carries (what save_pruned records) and the tdrop_training_config.json written into every
    checkpoint and the output directory hold the values applied."""
    import json

    from hf_tdrop import save_pruned

    model = patch_model(tiny_bert(), alpha=0.3, gamma=0.3, target_modules="intermediate.dense")
    schedule = TargetingSchedule(alpha=0.9, gamma=0.8, kind="linear", ramp_steps=2)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=1),
                      train_dataset=classification_data(), callbacks=[TargetedDropoutCallback(schedule)])
    with caplog.at_level(logging.WARNING, logger="hf_tdrop"):
        trainer.train()
    conflicts = [r.getMessage() for r in caplog.records if "was patched with" in r.getMessage()]
    assert len(conflicts) == 1 and "alpha=0.3, gamma=0.3" in conflicts[0] and "alpha=0.9, gamma=0.8" in conflicts[0]
    assert (model.tdrop_config.alpha, model.tdrop_config.gamma) == (0.9, 0.8)

    # checkpoint-2 was saved after updates 0 and 1; update 1 ran at schedule.at(1), half way
    checkpoint = json.loads((tmp_path / "checkpoint-2" / "tdrop_training_config.json").read_text())
    assert (checkpoint["alpha"], checkpoint["gamma"]) == pytest.approx((0.45, 0.4))
    assert checkpoint["target_modules"] == "intermediate.dense"
    final = json.loads((tmp_path / "tdrop_training_config.json").read_text())
    assert (final["alpha"], final["gamma"]) == (0.9, 0.8) and final["extra"]["schedule"] == schedule.to_dict()
    out = save_pruned(model, tmp_path / "export")
    meta = json.loads((out / "tdrop_config.json").read_text())
    assert (meta["targeted_dropout"]["alpha"], meta["targeted_dropout"]["gamma"]) == (0.9, 0.8)
    assert "| targeted dropout α (alpha) | 0.9 |" in (out / "README.md").read_text()

    # save_config=False writes nothing
    other = tmp_path / "quiet"
    trainer = Trainer(model=patch_model(tiny_bert(), alpha=0.9, gamma=0.8), args=training_args(other, max_steps=1),
                      train_dataset=classification_data(),
                      callbacks=[TargetedDropoutCallback(schedule, save_config=False)])
    trainer.train()
    assert not (other / "tdrop_training_config.json").exists()
