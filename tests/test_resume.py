"""Exact resume of a ramped targeted-dropout run, on a tiny BERT on CPU, through both paths:
``Trainer(resume_from_checkpoint=...)`` with TargetedDropoutCallback, and a plain accelerate loop
with TargetingScheduler + ``accelerator.save_state`` / ``load_state``. A run resumed at step k sees
the same α/γ at every later step as the uninterrupted run, and (fixed seeds) ends with the same
weights. Also: the accelerate loop applies the schedule per optimizer update under gradient
accumulation."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from transformers import Trainer

from conftest import tiny_bert
from hf_tdrop import (
    TargetedDropoutCallback,
    TargetedDropoutConfig,
    TargetingSchedule,
    TargetingScheduler,
    get_targeting,
    patch_model,
)
from test_callback import classification_data, logged, training_args

SCHEDULE = TargetingSchedule(alpha=0.99, gamma=0.9, kind="piecewise", ramp_steps=4)  # targets at step 8


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


# ---------------------------------------------------------------------------- Trainer
def make_trainer(output_dir, max_steps, callback):
    set_seed(0)
    model = tiny_bert()
    args = training_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=5)
    return Trainer(model=model, args=args, train_dataset=classification_data(), callbacks=[callback])


def test_trainer_resume_is_exact(tmp_path):
    """32 examples / batch 4 = 8 updates per epoch; resume at step 5 (mid-epoch, mid-ramp), run to 12."""
    # uninterrupted run (saves checkpoint-5 and checkpoint-10 on the way); the user patches the model
    full = make_trainer(tmp_path / "full", 12, TargetedDropoutCallback(SCHEDULE))
    patch_model(full.model, alpha=0.99, gamma=0.9)
    full.train()
    # resumed run: a fresh model, patched by the callback itself at train start
    config = TargetedDropoutConfig(alpha=0.99, gamma=0.9)
    resumed = make_trainer(tmp_path / "resumed", 12, TargetedDropoutCallback(SCHEDULE, config=config))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-5"))

    a, b = logged(full), logged(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 13))  # 1..5 come from the checkpoint's trainer_state
    assert a == b  # identical α/γ at every step ...
    assert a == {s: (SCHEDULE.alpha_at(s - 1), SCHEDULE.gamma_at(s - 1)) for s in range(1, 13)}  # ... = schedule
    assert len(set(a[s] for s in range(6, 10))) == 4  # steps after the resume are still ramping
    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-5)
    assert_same_weights(full.model, resumed.model)
    assert get_targeting(resumed.model) == get_targeting(full.model) == {"alpha": 0.99, "gamma": 0.9, "mode": "weight"}


# ---------------------------------------------------------------------------- accelerate loop
def accelerate_run(total_steps, ckpt_dir, save_at=None, resume=False, ga=1, record=None):
    """A plain accelerate training loop of ``total_steps`` optimizer updates (batch 4, 32 examples,
    no shuffling). Returns (model, {update k: (α, γ) used by update k})."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ga)
    set_seed(0)
    model = patch_model(tiny_bert(), alpha=SCHEDULE.alpha, gamma=SCHEDULE.gamma)
    data = classification_data()
    dataset = TensorDataset(torch.tensor(data["input_ids"]), torch.tensor(data["labels"]))
    # an explicit generator keeps DataLoader iterator creation off the global RNG (masks, dropout)
    loader = DataLoader(dataset, batch_size=4 // ga, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = TargetingScheduler(model, SCHEDULE, total_steps=total_steps)
    accelerator.register_for_checkpointing(scheduler)
    if resume:
        accelerator.load_state(ckpt_dir)  # restores weights, optimizer, RNG and scheduler.last_step
    if record is not None:
        model.register_forward_pre_hook(lambda m, args, kw: record.append((scheduler.last_step, get_targeting(m))),
                                        with_kwargs=True)
    used = {}
    updates_per_epoch = len(loader) // ga
    model.train()
    while scheduler.last_step < total_steps:
        done_in_epoch = scheduler.last_step % updates_per_epoch
        epoch_loader = accelerator.skip_first_batches(loader, done_in_epoch * ga) if done_in_epoch else loader
        for input_ids, labels in epoch_loader:
            with accelerator.accumulate(model):
                loss = model(input_ids=input_ids, labels=labels).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                used[scheduler.last_step] = tuple(scheduler.get_last_targeting().values())
                scheduler.step()
                if scheduler.last_step == save_at:
                    accelerator.save_state(ckpt_dir)
                if scheduler.last_step == total_steps:
                    break
    return accelerator.unwrap_model(model), used


def test_accelerate_loop_follows_schedule_with_gradient_accumulation(tmp_path):
    seen = []
    model, used = accelerate_run(10, tmp_path / "ckpt", ga=2, record=seen)
    expected = {k: (SCHEDULE.alpha_at(k), SCHEDULE.gamma_at(k)) for k in range(10)}
    assert used == expected
    # 2 micro-batches per update, each ran with the update's scheduled values in every patched layer
    assert [(k, (t["alpha"], t["gamma"])) for k, t in seen] == [(k, expected[k]) for k in range(10) for _ in (0, 1)]
    assert get_targeting(model) == {"alpha": 0.99, "gamma": 0.9, "mode": "weight"}  # after 10 steps
    assert model.tdrop_config.extra["schedule"] == SCHEDULE.to_dict()


def test_accelerate_resume_is_exact(tmp_path):
    ckpt = tmp_path / "state"
    full_model, full_used = accelerate_run(12, ckpt, save_at=5)  # uninterrupted, saves state after 5 updates
    resumed_model, resumed_used = accelerate_run(12, ckpt, resume=True)
    assert sorted(resumed_used) == list(range(5, 12))  # it really continued from update 5
    assert resumed_used == {k: full_used[k] for k in range(5, 12)}
    assert full_used == {k: (SCHEDULE.alpha_at(k), SCHEDULE.gamma_at(k)) for k in range(12)}
    assert len(set(resumed_used[k] for k in range(5, 9))) == 4  # mid-ramp at the resume point
    assert_same_weights(full_model, resumed_model)
    assert (ckpt / "custom_checkpoint_0.pkl").exists()
