"""examples/image_tables.py: runs trained one at a time are recorded, then combined into the paper's
comparison (γ marked, the paper's numbers beside the measured ones, Table 7, fine-tuning), and the
committed CIFAR-10 records build the committed tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import image_classification as ic  # noqa: E402
import image_tables as tables  # noqa: E402

CIFAR_RUNS = REPO_ROOT / "results/image_classification/cifar10-cpu/records"


def sweep(mode, values, levels=(0.0, 0.5, 0.9), method="magnitude", bn=False):
    return {"format": "hf-tdrop-sweep", "version": 1, "run_name": "x", "mode": mode, "method": method,
            "sparsities": list(levels), "metrics": {"accuracy": list(values)}, "pruned_fraction": None,
            "recalibration": {"method": "batchnorm"} if bn else None}


def record(name, spec, label, kind, method, mode, alpha=0.0, gamma=0.0, weight=(0.8, 0.7, 0.3), unit=(0.8, 0.5, 0.1),
           finetuned=False, unpruned=0.8, extra=None):
    return tables.RunRecord(
        name=name, spec=spec, label=label, kind=kind, method=method, mode=mode, alpha=alpha, gamma=gamma,
        unpruned={"unpruned": {"accuracy": unpruned}, **(extra or {})},
        sweeps={"weight": sweep("weight", weight), "weight_bn": sweep("weight", weight, bn=True),
                "unit": sweep("unit", unit), "unit_bn": sweep("unit", unit, bn=True)},
        train={"train_runtime": 600.0, "steps": 100, "seconds_per_step": 6.0},
        setting={"model_name_or_path": "base" if finetuned else None, "learning_rate": 0.02, "num_train_epochs": 3.0,
                 "sweep_split": "test"},
        machine="test machine")


def test_build_marks_gamma_and_sets_the_papers_numbers_beside(tmp_path):
    records = [
        record("none", "none", "none", "none", None, None, weight=(0.85, 0.8, 0.44), unpruned=0.85),
        record("td", "weight:0.75:0.9", "weight TD α=0.75 γ=0.9", "targeted_dropout", "targeted_dropout", "weight",
               0.75, 0.9, weight=(0.78, 0.78, 0.795), unpruned=0.78),
        record("l0", "l0:weight:0.1", "L0 weight λ=0.1", "method", "l0", "weight", weight=(0.8, 0.6, 0.2)),
        record("ft", "weight:0.75:0.9", "weight TD α=0.75 γ=0.9", "targeted_dropout", "targeted_dropout", "weight",
               0.75, 0.9, weight=(0.81, 0.8, 0.77), finetuned=True, unpruned=0.81),
        record("ri", "randinit:weight:0.9", "random pruning before training, weight 90%", "randinit", None, "weight",
               extra={"pruned_fraction": 0.897}, unpruned=0.7),
    ]
    records[-1].sweeps = {}  # a randinit run is evaluated as trained, never swept
    for r in records:
        (tmp_path / "runs").mkdir(exist_ok=True)
        (tmp_path / "runs" / f"{r.name}.json").write_text(json.dumps(r.to_dict()), encoding="utf-8")
    loaded = tables.load_records(tmp_path / "runs")
    assert [r.name for r in loaded] == ["none", "td", "l0", "ri", "ft"]  # table order, fine-tuned last
    text = tables.build(loaded, tmp_path / "out", plot=False)
    comparison = text.split("## Unit pruning")[0]
    assert "| none | 93.71 | 14.63 | 85.00 | 44.00 | 44.00 |" in comparison
    assert "| weight TD α=0.75 γ=0.9 | 92.53 | 92.48 | 78.00 | 79.50 | 79.50 |" in comparison
    assert "| L0 weight λ=0.1 | 88.83 | 12.55 |" in comparison
    assert "fine-tuned" not in comparison and "random pruning" not in comparison
    weight_table = text.split("## Weight pruning, as pruned")[1].split("##")[0]
    assert "| 90% | 44.00 | 79.50 ◆ | 20.00 | 77.00 ◆ |" in weight_table  # γ = 0.9 of the weight TD runs
    assert "| 50% | 80.00 | 78.00 | 60.00 | 80.00 |" in weight_table
    unit_table = text.split("## Unit pruning, as pruned")[1].split("##")[0]
    assert tables.MARK not in unit_table  # weight TD's γ is not marked in unit pruning
    table7 = text.split("## Table 7")[1].split("##")[0]
    assert "| random pruning before training (89.7% zero) | 90.66 | 70.00 |" in table7
    assert "| none, pruned after training | - | 44.00 | 44.00 |" in table7
    finetune = text.split("## Targeted dropout as a fine-tuning step")[1].split("##")[0]
    assert "| weight TD α=0.75 γ=0.9 | 3 | 0.02 | 81.00 | 90%: 77.00 | 79.50 | 10 min |" in finetune
    assert (tmp_path / "out" / "comparison.md").read_text(encoding="utf-8") == text


def test_the_tables_of_one_invocation_mark_each_td_runs_gamma_in_its_own_mode(tmp_path):
    """write_combined (image_classification.py's tables): the library's padded table, with ◆ after
    the value of each targeted-dropout run's γ row in its own pruning mode, and the note saying so;
    the CSV/JSON keep the plain numbers."""
    import run_specs
    from hf_tdrop import SweepResult, SweepTable

    runs = [run_specs.parse_run_spec(t) for t in ("none", "weight:0.75:0.9", "unit:0.9:0.5", "l1:0.1")]

    def result(spec, mode, values):
        return SweepResult(run_name=spec.label, mode=mode, method="magnitude", sparsities=[0.0, 0.5, 0.9],
                           metrics={"accuracy": list(values)})

    sweeps = {mode: [result(s, mode, (0.9, 0.8, 0.7 - i / 10)) for i, s in enumerate(runs)] for mode in ("weight", "unit")}
    tables.write_combined(tmp_path, sweeps, None, None, runs)
    weight = (tmp_path / "weight_pruning.md").read_text(encoding="utf-8")
    unit = (tmp_path / "unit_pruning.md").read_text(encoding="utf-8")
    assert "| 90%     | 0.7000 |               0.6000 ◆ |              0.5000 |   0.4000 |" in weight
    assert "| 50%     | 0.8000 |                 0.8000 |              0.8000 |   0.8000 |" in weight
    assert "| 50%     | 0.8000 |                 0.8000 |            0.8000 ◆ |   0.8000 |" in unit
    for text in (weight, unit):
        assert text.count(tables.MARK) == 2 and tables.MARK_NOTE in text and tables.CRITERIA_NOTE in text
        header = text.splitlines()[4]
        assert header.startswith("| prune % |   none |") and len({len(line) for line in text.splitlines()[4:8]}) == 1
    table = SweepTable.from_json(tmp_path / "weight_pruning.json")
    assert table.values[2] == pytest.approx([0.7, 0.6, 0.5, 0.4]) and tables.MARK not in (tmp_path / "weight_pruning.csv").read_text()
    assert (tmp_path / "results.md").read_text(encoding="utf-8") == weight + "\n" + unit
    # a table without a targeted-dropout run in its mode has no mark and no note
    tables.write_combined(tmp_path, {"weight": sweeps["weight"][:1]}, None, None, runs)
    assert tables.MARK not in (tmp_path / "weight_pruning.md").read_text(encoding="utf-8")


def test_record_reads_a_finished_run_and_refuses_an_unfinished_one(tmp_path):
    out = tmp_path / "out"
    ic.main(["--runs", "none,weight:0.75:0.9", "--num_train_epochs", "1", "--sparsities", "0,0.9",
             "--output_dir", str(out), "--disable_tqdm", "--save_strategy", "no", "--max_train_samples", "200",
             "--max_eval_samples", "100"])
    paths = tables.record_runs(out, tmp_path / "runs", machine="m")
    assert sorted(p.name for p in paths) == ["none.json", "weight-a0.75-g0.9.json"]
    rec = tables.RunRecord.from_dict(json.loads(paths[1].read_text(encoding="utf-8")))
    assert rec.gamma == 0.9 and rec.mode == "weight" and set(rec.sweeps) == {"weight", "unit"}
    assert rec.sweeps["weight"]["sparsities"] == [0.0, 0.9] and rec.train["steps"] > 0
    assert rec.train["seconds_per_step"] > 0 and rec.machine == "m"
    # a run finished by a resumed process: its runtime covers the steps after the checkpoint only
    steps = rec.train["steps"]
    resumed = tables.record_runs(out, tmp_path / "resumed", machine="m", resumed_at_step=steps // 2)
    again = tables.RunRecord.from_dict(json.loads(resumed[1].read_text(encoding="utf-8")))
    assert again.train["seconds_per_step"] == pytest.approx(rec.train["seconds_per_step"] * steps / (steps - steps // 2))
    assert f"(steps {steps // 2}–{steps}, resumed)" in tables.cost_table([again])
    with pytest.raises(SystemExit, match="--resumed_at_step"):
        tables.record_runs(out, tmp_path / "bad", resumed_at_step=steps)
    summary = json.loads((out / "run_summary.json").read_text(encoding="utf-8"))
    del summary["unpruned"]["none"]
    (out / "run_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    with pytest.raises(SystemExit, match="no sweep yet"):
        tables.record_runs(out, tmp_path / "runs2")
    with pytest.raises(SystemExit):
        tables.main(["record", str(tmp_path / "nowhere"), "--into", str(tmp_path)])


def test_committed_cifar_records_rebuild_the_committed_comparison(tmp_path):
    records = tables.load_records(CIFAR_RUNS)
    assert {r.name for r in records} >= {"none", "weight-a0.75-g0.9", "unit-a0.9-g0.75"}
    text = tables.build(records, tmp_path, plot=False)
    committed = (CIFAR_RUNS.parent / "comparison.md").read_text(encoding="utf-8")
    assert text == committed
