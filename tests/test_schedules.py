"""TargetingSchedule values (every kind, the reference piecewise numbers), validation, resolution,
and TargetingScheduler (step semantics, state_dict round trip, errors) on a tiny patched model."""

import json
import logging
import math

import pytest

from conftest import tiny_bert
from hf_tdrop import (
    SCHEDULE_KINDS,
    TargetedDropoutConfig,
    TargetingSchedule,
    TargetingScheduler,
    get_targeting,
    patch_model,
    targeted_layers,
)


def values(schedule, steps):
    return [(schedule.alpha_at(s), schedule.gamma_at(s)) for s in steps]


# ---------------------------------------------------------------------------- kinds
def test_piecewise_reference_numbers():
    """The paper code's ramp: γ 95 % of target at N, 100 % at 2N; α linear to 2N."""
    s = TargetingSchedule(alpha=0.99, gamma=0.99, kind="piecewise", ramp_steps=100)
    expected = {
        0: (0.0, 0.0),
        50: (0.99 * 50 / 200, 0.95 * 0.99 * 50 / 100),        # 0.2475, 0.470250
        100: (0.495, 0.9405),
        150: (0.7425, 0.99 * (0.95 + 0.05 * 50 / 100)),        # γ = 0.96525
        199: (0.99 * 199 / 200, 0.99 * (0.95 + 0.05 * 99 / 100)),
        200: (0.99, 0.99),
        10_000: (0.99, 0.99),
    }
    for step, (a, g) in expected.items():
        assert s.alpha_at(step) == pytest.approx(a, abs=1e-12), step
        assert s.gamma_at(step) == pytest.approx(g, abs=1e-12), step
    assert s.gamma_at(150) == pytest.approx(0.96525, abs=1e-12)
    assert s.at(200) == {"alpha": 0.99, "gamma": 0.99}  # exactly the targets
    assert s.target_step == 200


def test_linear_with_delay():
    s = TargetingSchedule(alpha=0.5, gamma=0.8, kind="linear", ramp_steps=10, delay_steps=5)
    assert values(s, [0, 3, 5]) == [(0.0, 0.0)] * 3
    assert s.at(6) == pytest.approx({"alpha": 0.05, "gamma": 0.08})
    assert s.at(10) == pytest.approx({"alpha": 0.25, "gamma": 0.4})
    assert s.at(14) == pytest.approx({"alpha": 0.45, "gamma": 0.72})
    assert values(s, [15, 16, 1000]) == [(0.5, 0.8)] * 3
    assert s.target_step == 15


def test_cosine():
    s = TargetingSchedule(alpha=0.6, gamma=0.9, kind="cosine", ramp_steps=10)
    assert s.at(0) == {"alpha": 0.0, "gamma": 0.0}
    assert s.at(5) == pytest.approx({"alpha": 0.3, "gamma": 0.45})
    f3 = (1 - math.cos(math.pi * 0.3)) / 2  # 0.2061
    assert s.at(3) == pytest.approx({"alpha": 0.6 * f3, "gamma": 0.9 * f3})
    assert s.gamma_at(3) < 0.9 * 0.3  # slower than linear at the start
    assert s.gamma_at(7) > 0.9 * 0.7  # faster than linear towards the middle/end
    assert s.at(10) == {"alpha": 0.6, "gamma": 0.9}


def test_constant_ignores_ramp_but_honours_delay():
    s = TargetingSchedule(alpha=0.66, gamma=0.75, kind="constant", ramp_steps=50)
    assert values(s, [0, 1, 49, 50, 500]) == [(0.66, 0.75)] * 5
    assert s.target_step == 0
    d = TargetingSchedule(alpha=0.66, gamma=0.75, kind="constant", delay_steps=3, alpha_start=0.1)
    assert values(d, [0, 2, 3, 4]) == [(0.1, 0.0), (0.1, 0.0), (0.66, 0.75), (0.66, 0.75)]


def test_start_values_and_decreasing_ramp():
    s = TargetingSchedule(alpha=0.5, gamma=0.2, kind="linear", ramp_steps=4, alpha_start=0.1, gamma_start=0.6)
    assert s.at(0) == {"alpha": 0.1, "gamma": 0.6}
    assert s.at(2) == pytest.approx({"alpha": 0.3, "gamma": 0.4})
    assert s.at(4) == {"alpha": 0.5, "gamma": 0.2}


@pytest.mark.parametrize("kind", ["linear", "cosine", "piecewise"])
def test_zero_ramp_is_immediate_and_values_monotone(kind):
    assert TargetingSchedule(0.3, 0.4, kind=kind, ramp_steps=0).at(0) == {"alpha": 0.3, "gamma": 0.4}
    s = TargetingSchedule(0.99, 0.99, kind=kind, ramp_steps=7, delay_steps=2)
    seq = values(s, range(30))
    assert all(0.0 <= a <= 0.99 and 0.0 <= g <= 0.99 for a, g in seq)
    assert all(x[0] <= y[0] and x[1] <= y[1] for x, y in zip(seq, seq[1:]))
    assert seq[s.target_step] == (0.99, 0.99) and seq[s.target_step - 1] != (0.99, 0.99)


# ---------------------------------------------------------------------------- resolution, metadata
def test_ramp_fraction_resolve():
    s = TargetingSchedule(0.5, 0.5, kind="linear", ramp_fraction=0.25)
    assert not s.is_resolved
    with pytest.raises(ValueError, match=r"resolve\(total_steps\)"):
        s.at(3)
    r = s.resolve(40)
    assert (r.ramp_steps, r.ramp_fraction, r.is_resolved) == (10, None, True)
    assert r.at(5) == pytest.approx({"alpha": 0.25, "gamma": 0.25})
    assert s.ramp_fraction == 0.25  # resolve returns a copy; the schedule is immutable
    assert s.resolve(3).ramp_steps == 1  # round(0.75) = 1
    assert s.resolve(1).ramp_steps == 1  # at least one step for a positive fraction
    assert TargetingSchedule(0.5, 0.5, ramp_fraction=0.0).resolve(100).ramp_steps == 0
    assert TargetingSchedule(0.5, 0.5, kind="piecewise", ramp_fraction=0.5).resolve(30).target_step == 30
    steps = TargetingSchedule(0.5, 0.5, ramp_steps=7)
    assert steps.resolve(1000) == steps
    with pytest.raises(ValueError, match="total_steps"):
        s.resolve(-1)


def test_to_dict_round_trip_is_json():
    s = TargetingSchedule(0.99, 0.99, kind="piecewise", ramp_steps=100, delay_steps=3, gamma_start=0.1)
    d = json.loads(json.dumps(s.to_dict()))
    assert d == {"alpha": 0.99, "gamma": 0.99, "kind": "piecewise", "ramp_steps": 100, "ramp_fraction": None,
                 "delay_steps": 3, "alpha_start": 0.0, "gamma_start": 0.1}
    assert TargetingSchedule.from_dict(d) == s
    with pytest.raises(ValueError, match=r"Unknown TargetingSchedule fields \['warmup'\]"):
        TargetingSchedule.from_dict({**d, "warmup": 3})


def test_check_total_steps_warns_with_numbers(caplog):
    s = TargetingSchedule(0.99, 0.9, kind="piecewise", ramp_steps=30)  # targets at step 60
    with caplog.at_level(logging.WARNING, logger="hf_tdrop.schedules"):
        assert s.check_total_steps(60) is True
        assert not caplog.records
        assert s.check_total_steps(40) is False
    (record,) = caplog.records
    msg = record.getMessage()
    assert "never be reached" in msg and "step 60" in msg and "40 steps" in msg
    last = s.at(39)
    assert f"alpha={last['alpha']:.4g}, gamma={last['gamma']:.4g}" in msg


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="exponential", ramp_steps=3), r"`kind` must be one of \['constant', 'linear', 'cosine', 'piecewise'\]"),
    (dict(ramp_steps=-1), r"`ramp_steps` must be a non-negative integer, got -1"),
    (dict(ramp_steps=2.5), r"`ramp_steps` must be a non-negative integer"),
    (dict(ramp_steps=True), r"`ramp_steps` must be a non-negative integer"),
    (dict(ramp_steps=3, delay_steps=-2), r"`delay_steps` must be a non-negative integer, got -2"),
    (dict(ramp_fraction=1.5), r"`ramp_fraction` must be in \[0, 1\]"),
    (dict(ramp_steps=3, ramp_fraction=0.5), r"exactly one of `ramp_steps`.*\['ramp_steps', 'ramp_fraction'\]"),
    (dict(), r"exactly one of `ramp_steps`.*neither"),
    (dict(alpha=1.5, ramp_steps=3), r"`alpha` must be in \[0, 1\], got 1.5"),
    (dict(gamma=-0.1, ramp_steps=3), r"`gamma` must be in \[0, 1\], got -0.1"),
    (dict(gamma=float("nan"), ramp_steps=3), r"`gamma` must be in \[0, 1\]"),
    (dict(alpha_start=2, ramp_steps=3), r"`alpha_start` must be in \[0, 1\]"),
    (dict(kind="constant", delay_steps=-1), r"`delay_steps`"),
])
def test_validation(kwargs, match):
    args = dict(alpha=0.5, gamma=0.5, kind="linear")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TargetingSchedule(**args)


def test_bad_step():
    s = TargetingSchedule(0.5, 0.5, ramp_steps=3)
    for bad in (-1, 1.0, None):
        with pytest.raises(ValueError, match="`step` must be a non-negative integer"):
            s.at(bad)
    assert set(SCHEDULE_KINDS) == {"constant", "linear", "cosine", "piecewise"}


# ---------------------------------------------------------------------------- TargetingScheduler
def patched_bert():
    return patch_model(tiny_bert(), alpha=0.5, gamma=0.5)


def layer_values(model):
    return {(v["alpha"], v["gamma"]) for v in targeted_layers(model).values()}


def test_scheduler_applies_like_lr_scheduler():
    model = patched_bert()
    s = TargetingSchedule(0.8, 0.6, kind="linear", ramp_steps=4, delay_steps=1)
    sched = TargetingScheduler(model, s)
    assert sched.last_step == 0 and layer_values(model) == {(0.0, 0.0)}  # step 0 applied at construction
    seen = []
    for _ in range(7):
        sched.step()
        seen.append(get_targeting(model))
        assert sched.get_last_targeting() == s.at(sched.last_step)
    assert [(d["alpha"], d["gamma"]) for d in seen] == values(s, range(1, 8))
    assert layer_values(model) == {(0.8, 0.6)}
    assert model.tdrop_config.extra["schedule"] == s.to_dict()  # recorded for export metadata


def test_scheduler_state_dict_round_trip(caplog):
    s = TargetingSchedule(0.99, 0.99, kind="piecewise", ramp_steps=5)
    a = TargetingScheduler(patched_bert(), s)
    for _ in range(6):
        a.step()
    state = a.state_dict()
    assert state == {"last_step": 6, "schedule": s.to_dict()}
    model_b = patched_bert()
    b = TargetingScheduler(model_b, s)
    b.load_state_dict(state)
    assert b.last_step == 6 and get_targeting(model_b) == {**s.at(6), "mode": "weight"}
    b.step()
    assert get_targeting(model_b) == {**s.at(7), "mode": "weight"}
    # a different saved schedule: warned about, own schedule kept
    c = TargetingScheduler(patched_bert(), TargetingSchedule(0.5, 0.5, ramp_steps=2))
    with caplog.at_level(logging.WARNING, logger="hf_tdrop.schedules"):
        c.load_state_dict(state)
    assert "continuing with the latter" in caplog.text and c.get_last_targeting() == {"alpha": 0.5, "gamma": 0.5}
    with pytest.raises(ValueError, match=r"`state_dict\['last_step'\]` must be a non-negative integer"):
        c.load_state_dict({"last_step": -3})


def test_scheduler_ramp_fraction_and_total_steps(caplog):
    model = patched_bert()
    frac = TargetingSchedule(0.5, 0.5, kind="linear", ramp_fraction=0.5)
    with pytest.raises(ValueError, match="pass `total_steps`"):
        TargetingScheduler(model, frac)
    sched = TargetingScheduler(model, frac, total_steps=20)
    assert sched.schedule.ramp_steps == 10 and model.tdrop_config.extra["schedule"]["ramp_steps"] == 10
    with caplog.at_level(logging.WARNING, logger="hf_tdrop.schedules"):
        TargetingScheduler(model, TargetingSchedule(0.5, 0.5, ramp_steps=50), total_steps=20)
    assert "reaches its targets alpha=0.5, gamma=0.5 only at step 50" in caplog.text
    assert "training has 20 steps" in caplog.text


def test_scheduler_errors():
    s = TargetingSchedule(0.5, 0.5, ramp_steps=3)
    with pytest.raises(ValueError, match="no patched layer; call patch_model first"):
        TargetingScheduler(tiny_bert(), s)
    with pytest.raises(ValueError, match="`schedule` must be a TargetingSchedule, got dict"):
        TargetingScheduler(patched_bert(), s.to_dict())
    with pytest.raises(ValueError, match="`total_steps` must be a non-negative integer"):
        TargetingScheduler(patched_bert(), s, total_steps=-5)
    # a scheduler is unaffected by the config's own alpha/gamma
    model = patch_model(tiny_bert(), config=TargetedDropoutConfig(alpha=0.9, gamma=0.9, mode="unit"))
    TargetingScheduler(model, s)
    assert get_targeting(model) == {"alpha": 0.0, "gamma": 0.0, "mode": "unit"}
