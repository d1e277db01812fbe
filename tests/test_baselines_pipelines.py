"""The paper's baselines through the example pipelines: the run-spec grammar, the image pipeline's
method runs (regulariser, finalisation, per-column criterion, random pruning before training) and
the translation script's ``--method``. Tiny models and few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageClassification, AutoModelForSeq2SeqLM

import hf_tdrop
from hf_tdrop import DropoutConfig, L0Config, L1Config, RandomTargetConfig, SmallifyConfig, TargetedDropoutConfig
from hf_tdrop import VariationalDropoutConfig
from hf_tdrop.methods import config_from_dict

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "examples"))
import image_classification as ic  # noqa: E402
import image_presets  # noqa: E402
import run_specs  # noqa: E402

FAST = ["--disable_tqdm", "--save_strategy", "no", "--logging_steps", "5"]


# ---------------------------------------------------------------------------------------------- grammar


@pytest.mark.parametrize("text, cls, fields, label", [
    ("weight:0.75:0.9", TargetedDropoutConfig, dict(alpha=0.75, gamma=0.9, mode="weight"), "weight TD α=0.75 γ=0.9"),
    ("unit:0.99:0.95:ramp", TargetedDropoutConfig, dict(alpha=0.99, gamma=0.95, mode="unit"),
     "unit TD α=0.99 γ=0.95, ramped (piecewise)"),
    ("random:weight:0.75:0.9", RandomTargetConfig, dict(alpha=0.75, gamma=0.9, mode="weight"),
     "random-target weight α=0.75 γ=0.9"),
    ("dropout:unit:0.25", DropoutConfig, dict(rate=0.25, mode="unit"), "dropout unit 0.25"),
    ("l1:0.01", L1Config, dict(l1=0.01), "L1 λ=0.01"),
    ("l0:weight:1e-3", L0Config, dict(l0=1e-3, mode="weight", dataset_size=1347), "L0 weight λ=0.001"),
    ("l0:unit:1e-3", L0Config, dict(l0=1e-3, mode="unit"), "L0 unit λ=0.001"),
    ("vd", VariationalDropoutConfig, dict(kl_scale=1.0, kl_warmup_steps=0, dataset_size=1347), "variational dropout ×1"),
    ("variational:0.01:0.5", VariationalDropoutConfig, dict(kl_scale=0.01, kl_warmup_steps=50),
     "variational dropout ×0.01, KL warm-up 50%"),
    ("smallify:1e-4", SmallifyConfig, dict(l1=1e-4), "Smallify λ=0.0001"),
    ("mine=l1:0.1", L1Config, dict(l1=0.1), "mine"),
])
def test_a_spec_parses_into_the_registry_config(text, cls, fields, label):
    spec = run_specs.parse_run_spec(text, default_schedule="constant")
    config = spec.config(dataset_size=1347, total_updates=100, exclude_modules=["stem"])
    assert type(config) is cls and spec.label == label
    assert all(getattr(config, k) == v for k, v in fields.items()), config
    assert config.exclude_modules == ["stem"]
    assert config_from_dict(run_specs.config_dict(config)) == config  # the summary's dict reads back


def test_randinit_and_schedule_specs():
    run = run_specs.parse_run_spec("randinit:unit:0.85")
    assert (run.kind, run.mode, run.sparsity, run.config()) == ("randinit", "unit", 0.85, None)
    # a TD spec without SCHEDULE follows --schedule; 'ramp' is --schedule when it ramps, else piecewise
    assert run_specs.parse_run_spec("weight:0.5:0.5", "cosine").schedule == "cosine"
    assert run_specs.parse_run_spec("weight:0.5:0.5:ramp", "cosine").schedule == "cosine"
    assert run_specs.parse_run_spec("weight:0.5:0.5:ramp").schedule == "piecewise"
    preset = ic.parse_args(["--preset", "digits-baselines"])
    kinds = {s.method or s.kind for s in preset.run_specs}
    assert kinds == {"none", "dropout", "l1", "l0", "variational_dropout", "smallify", "random_target",
                     "targeted_dropout", "randinit"}
    assert ic.table7_levels(preset) == {"weight": [0.5, 0.75, 0.9, 0.99], "unit": [0.75, 0.85, 0.9, 0.95]}
    assert ic.run_weight_decay(preset, next(s for s in preset.run_specs if s.method == "variational_dropout")) == 0.0
    assert ic.run_weight_decay(preset, preset.run_specs[0]) == 2e-4


@pytest.mark.parametrize("bad, reason", [
    ("l0:0.1", "expected l0:MODE:LAMBDA"),
    ("dropout:weight:1.5", "`rate` must be in [0, 1)"),
    ("foo:1", "unknown method 'foo'"),
    ("l1:abc", "LAMBDA must be a number"),
    ("randinit:weight:1", "SPARSITY must be in (0, 1)"),
    ("weight:0.5:0.5:sometimes", "SCHEDULE must be one of"),
])
def test_a_bad_spec_is_one_line_naming_runs_the_spec_and_the_grammar(bad, reason, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        ic.main(["--runs", f"none,{bad}", "--output_dir", str(tmp_path / "never")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err
    assert "--runs" in err and repr(bad) in err and reason in err and "allowed: none | MODE:ALPHA:GAMMA" in err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("method, setting, head, values", [
    ("targeted_dropout", "alpha", "weight:{}:0.5", (-0.01, 0.0, 0.5, 1.0, 1.01)),
    ("targeted_dropout", "gamma", "unit:0.5:{}", (-0.01, 0.0, 1.0, 1.01)),
    ("random_target", "alpha", "random:weight:{}:0.5", (-0.01, 0.0, 1.0, 1.01)),
    ("dropout", "rate", "dropout:weight:{}", (-0.01, 0.0, 0.5, 0.999, 1.0)),
    ("l1", "l1", "l1:{}", (-1.0, 0.0, 1e-9, 30.0)),
    ("l0", "l0", "l0:unit:{}", (-1.0, 0.0, 1e-3)),
    ("smallify", "l1", "smallify:{}", (-1e-4, 0.0, 1e-4)),
    ("variational_dropout", "kl_scale", "vd:{}", (-1.0, 0.0, 0.01, 1.0)),
])
def test_the_grammars_checks_and_labels_are_the_config_classes(method, setting, head, values):
    """run_specs checks a spec's numbers without importing hf_tdrop: it accepts exactly the values the
    method's config class accepts, with the same message, and labels the column as the config does."""
    for value in values:
        text = head.format(value)
        try:
            library = hf_tdrop.method_config(method, **_settings_of(text), **_size_of(method))
        except ValueError as err:
            with pytest.raises(run_specs.RunSpecError) as info:
                run_specs.parse_run_spec(text)
            assert str(err).rstrip(".") in str(info.value), (text, str(info.value))
            continue
        spec = run_specs.parse_run_spec(text)
        assert spec.config(dataset_size=10) == hf_tdrop.method_config(method, **spec.settings, **_size_of(method))
        if method != "targeted_dropout":  # targeted dropout's label is the script's own ("weight TD α=… γ=…")
            assert spec.label == library.run_label(), text


def _size_of(method):
    return {"dataset_size": 10} if method in ("l0", "variational_dropout") else {}


def _settings_of(text):
    """The settings a spec names, read without run_specs (so that its checks are not used)."""
    parts = text.split(":")
    if parts[0] in ("weight", "unit"):
        return dict(mode=parts[0], alpha=float(parts[1]), gamma=float(parts[2]))
    if parts[0] == "random":
        return dict(mode=parts[1], alpha=float(parts[2]), gamma=float(parts[3]))
    if parts[0] in ("dropout", "l0"):
        return {"mode": parts[1], "rate" if parts[0] == "dropout" else "l0": float(parts[2])}
    if parts[0] == "vd":
        return dict(kl_scale=float(parts[1]))
    return {"l1": float(parts[1])}


def test_the_grammars_schedule_kinds_are_the_librarys():
    assert run_specs.SCHEDULE_KINDS == tuple(hf_tdrop.SCHEDULE_KINDS)


def test_parsing_valid_runs_imports_neither_torch_nor_hf_tdrop(tmp_path):
    """--runs (image_classification.py) and --method (wmt_en_de.py) are parsed without torch: a
    valid value as much as a bad one (the scripts import torch only once the flags are parsed)."""
    probe = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT / 'examples')!r})\n"
        "import image_presets, translation_presets\n"
        "args = image_presets.parse_args(['--preset', 'digits-baselines', '--runs', "
        "image_presets.BASELINE_RUNS + ',mine=vd:0.01:0.5,weight:0.5:0.5:cosine'])\n"
        "method = translation_presets.parse_args(['--output_dir', 'o', '--method', 'l0:weight:1e-3']).method_spec\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'hf_tdrop', 'accelerate', 'datasets'})\n"
        "print(json.dumps([len(args.run_specs), args.run_specs[-2].label, method.label, heavy]))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_runs, label, method_label, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert n_runs == len(image_presets.BASELINE_RUNS.split(",")) + 2
    assert (label, method_label, heavy) == ("mine", "L0 weight λ=0.001", [])


# ---------------------------------------------------------------------------------------------- image pipeline


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "out"
    argv = ["--output_dir", str(out), "--max_steps", "40", "--mlp_hidden_sizes", "24", "--sparsities", "0,0.5",
            "--runs", "none,l1:30,l0:weight:0.1,l0:unit:0.1,vd:1:0.5,smallify:1e-4,random:weight:0.5:0.5,"
            "weight:0.5:0.5:ramp,randinit:weight:0.75,randinit:unit:0.5", *FAST]
    ic.main(argv)
    return out, argv


def test_each_column_is_swept_by_its_own_criterion(method_runs):
    out, _ = method_runs
    weight = json.loads((out / "weight_pruning_criteria.json").read_text())
    unit = json.loads((out / "unit_pruning_criteria.json").read_text())
    assert weight == {"none": "magnitude", "L1 λ=30": "magnitude", "L0 weight λ=0.1 (gates)": "gates",
                      "L0 unit λ=0.1": "magnitude", "variational dropout ×1, KL warm-up 50% (log_alpha)": "log_alpha",
                      "Smallify λ=0.0001": "magnitude", "random-target weight α=0.5 γ=0.5": "magnitude",
                      "weight TD α=0.5 γ=0.5, ramped (piecewise)": "magnitude"}
    assert unit["L0 unit λ=0.1 (gates)"] == "gates" and unit["L0 weight λ=0.1"] == "magnitude"
    assert unit["variational dropout ×1, KL warm-up 50%"] == "magnitude"  # per-weight log α: weight mode only
    assert set(unit.values()) == {"magnitude", "gates"}
    # the per-run sweep files record the criterion too; the tables name it and explain it
    assert json.loads((out / "l0-weight-0.1" / "sweep-weight.json").read_text())["method"] == "gates"
    table = (out / "weight_pruning.md").read_text()
    assert "L0 weight λ=0.1 (gates)" in table and "Pruning criterion: magnitude" in table
    assert "randinit" not in table and "random pruning before training" not in table  # Table 7 only


def test_method_checkpoints_are_plain_and_the_regulariser_reached_training(method_runs):
    out, argv = method_runs
    plain = set(AutoModelForImageClassification.from_pretrained(out / "none").state_dict())
    means = {}
    for run in ("none", "l1-30", "l0-weight-0.1", "vd-1-w0.5", "smallify-0.0001", "random-weight-a0.5-g0.5"):
        model = AutoModelForImageClassification.from_pretrained(out / run)
        assert set(model.state_dict()) == plain, run  # finalize_model stripped gates / log σ² / switches / scores
        means[run] = model.layers[0].weight.abs().mean().item()
    assert means["l1-30"] < 0.5 * means["none"]  # the L1 term was back-propagated
    state = json.loads((out / "vd-1-w0.5" / "trainer_state.json").read_text())
    regs = [h["regularization_loss"] for h in state["log_history"] if "regularization_loss" in h]
    assert regs and regs[0] < regs[-1]  # the KL warm-up: the term grows from 0 over the first 20 updates
    # the learned order is kept beside the checkpoint, so --no-do_train sweeps by the same criterion
    assert (out / "l0-weight-0.1" / "tdrop_criteria.safetensors").is_file()
    again = out.parent / "again"
    ic.main([*argv[2:], "--output_dir", str(again), "--runs", "l0:weight:0.1", "--no-do_train",
             "--trained_models_dir", str(out)])
    first = json.loads((out / "l0-weight-0.1" / "sweep-weight.json").read_text())
    second = json.loads((again / "l0-weight-0.1" / "sweep-weight.json").read_text())
    assert second["method"] == "gates" and second["metrics"] == first["metrics"]


def test_a_run_saved_with_the_legacy_criterion_file_still_sweeps_by_its_criterion(method_runs, tmp_path):
    """Runs trained by earlier versions of the script keep their learned order in
    ``learned_criterion.pt`` (torch.save of {layer: {"name", "granularity", "scores"}}): --no-do_train
    reads it and sweeps by the same criterion, to the same numbers."""
    import shutil

    out, argv = method_runs
    models = tmp_path / "models"
    legacy = models / "l0-weight-0.1"
    shutil.copytree(out / "l0-weight-0.1", legacy, ignore=shutil.ignore_patterns("sweep-*", "checkpoint-*"))
    model = AutoModelForImageClassification.from_pretrained(legacy)
    learned = hf_tdrop.load_learned_criteria(model, legacy)
    assert learned and {c.name for c in learned.values()} == {"gates"}
    torch.save({name: {"name": c.name, "granularity": c.granularity, "scores": c.scores.cpu()}
                for name, c in learned.items()}, legacy / "learned_criterion.pt")
    (legacy / "tdrop_criteria.safetensors").unlink()
    again = tmp_path / "again"
    ic.main([*argv[2:], "--output_dir", str(again), "--runs", "l0:weight:0.1", "--no-do_train",
             "--trained_models_dir", str(models)])
    first = json.loads((out / "l0-weight-0.1" / "sweep-weight.json").read_text())
    second = json.loads((again / "l0-weight-0.1" / "sweep-weight.json").read_text())
    assert second["method"] == "gates" and second["metrics"] == first["metrics"]
    assert not (legacy / "tdrop_criteria.safetensors").exists()  # evaluating writes nothing beside the model


def test_random_pruning_before_training_keeps_exactly_the_pruned_weights_at_zero(method_runs):
    out, argv = method_runs
    args = ic.parse_args(argv)
    data = ic.prepare_data(args)
    summary = json.loads((out / "run_summary.json").read_text())
    for run, mode, sparsity in (("randinit-weight-0.75", "weight", 0.75), ("randinit-unit-0.5", "unit", 0.5)):
        # the same initialisation and random draw as the run: the mask it pruned at initialisation
        ic.set_seed(args.seed)
        fresh = ic.build_model(args, data)
        hf_tdrop.prune_model(fresh, sparsity, mode=mode, method="random",
                             generator=torch.Generator().manual_seed(args.seed))
        trained = AutoModelForImageClassification.from_pretrained(out / run)
        for a, b in zip(fresh.layers, trained.layers):
            assert torch.equal(a.weight == 0, b.weight == 0), run  # zero exactly where pruned, nowhere else
            assert not torch.equal(a.weight, b.weight)  # and the rest trained
        assert summary["train_metrics"][run]["held_weights_nonzero_after_training"] == 0
    table = json.loads((out / "table7.json").read_text())
    assert table["weight"]["sparsities"] == [0.75] and table["unit"]["sparsities"] == [0.5]
    assert list(table["weight"]["columns"]) == ["random pruning before training", "none, pruned after training",
                                                "weight TD α=0.5 γ=0.5, ramped (piecewise), pruned after training"]
    assert table["weight"]["random_init_pruned_fraction"][0] == pytest.approx(0.75, abs=0.02)
    assert "Table 7" in (out / "results.md").read_text()


# ---------------------------------------------------------------------------------------------- translation


def test_translation_method_trains_finalises_to_a_plain_checkpoint_and_sweeps_by_its_criterion(tmp_path):
    import wmt_en_de
    from test_wmt_en_de import small_args

    out = tmp_path / "l0"
    wmt_en_de.main(small_args(out, 3, "--method", "l0:weight:0.1", "--sweep_modes", "weight", "unit"))
    history = json.loads((out / "train_history.json").read_text())["history"]
    assert history and all(h["regularization_loss"] > 0 for h in history)
    model = AutoModelForSeq2SeqLM.from_pretrained(out)  # stock loading, no hf-tdrop tensor in the checkpoint
    from safetensors.torch import load_file

    assert not any("l0_" in k for k in load_file(out / "model.safetensors"))
    assert model.config.model_type == "marian"
    weight = json.loads((out / "sweeps" / "sweep-validation-weight.json").read_text())
    unit = json.loads((out / "sweeps" / "sweep-validation-unit.json").read_text())
    assert (weight["method"], unit["method"]) == ("gates", "magnitude")
    assert weight["run_name"] == "L0 weight λ=0.1" and 0.85 < weight["pruned_fraction"][2] <= 0.9


@pytest.mark.parametrize("spec, extra_key, criterion, label", [
    ("dropout:weight:0.25", None, "magnitude", "dropout weight 0.25"),
    ("l1:0.1", "l1_", "magnitude", "L1 λ=0.1"),
    ("vd:1:0.5", "vd_", "log_alpha", "variational dropout ×1"),
])
def test_translation_other_weight_level_methods_train_and_sweep(tmp_path, spec, extra_key, criterion, label):
    """dropout, L1 and variational dropout through the translation script: a regulariser in the loss
    where the method has one, a plain checkpoint, the sweep by the method's criterion."""
    import wmt_en_de
    from safetensors.torch import load_file
    from test_wmt_en_de import small_args

    out = tmp_path / "run"
    wmt_en_de.main(small_args(out, 3, "--method", spec))
    history = json.loads((out / "train_history.json").read_text())["history"]
    if spec.startswith("dropout"):
        assert all(h.get("regularization_loss", 0.0) == 0.0 for h in history)
    else:
        assert history[-1]["regularization_loss"] > 0
    if spec.startswith("vd"):  # KL warm-up over half of the 3 updates: the weight grows
        assert history[0]["regularization_loss"] < history[-1]["regularization_loss"]
    keys = load_file(out / "model.safetensors")
    assert extra_key is None or not any(extra_key in k for k in keys)
    AutoModelForSeq2SeqLM.from_pretrained(out)
    sweep = json.loads((out / "sweeps" / "sweep-validation-weight.json").read_text())
    assert sweep["method"] == criterion and sweep["run_name"].startswith(label.split(" ")[0])


@pytest.mark.parametrize("extra, message", [
    (["--method", "smallify:1e-4"], "not a weight-level method"),
    (["--method", "l0:unit:1e-3"], "not a weight-level method"),
    (["--method", "l0:1e-3"], "--method: bad run spec 'l0:1e-3': expected l0:MODE:LAMBDA; allowed: none | dropout"),
    (["--method", "l1:0.1", "--td_mode", "weight"], "choose one training method"),
])
def test_translation_bad_method_is_one_line_exit_2(extra, message, tmp_path, capsys):
    import wmt_en_de

    with pytest.raises(SystemExit) as info:
        wmt_en_de.parse_args(["--output_dir", str(tmp_path / "never"), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
