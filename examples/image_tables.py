#!/usr/bin/env python
"""The paper's comparison tables from runs trained one at a time (``image_classification.py``).

Runs of a long recipe (``--preset cifar10-cpu``) are trained in separate invocations, often side by
side. Each finished run is *recorded* into one small JSON file (its spec, unpruned numbers, every
sweep, training time and machine), and the tables are *built* from every recorded run:

* the combined sweep tables (rows = fraction pruned, one column per run) for weight and unit
  pruning, as pruned and with BatchNorm statistics re-estimated, with each targeted-dropout run's γ
  marked (``◆``: the level it was trained for), plus a plot of each;
* the paper's comparison: one row per method, the paper's number (ResNet-32, 256 epochs) beside the
  measured one at the paper's level (90 % weight pruning, 50 % unit pruning);
* Table 7 (random pruning before training vs. pruning after training at the same sparsity);
* targeted dropout as a fine-tuning step against the runs trained from scratch.

It also writes the tables of one ``image_classification.py`` invocation (:func:`write_combined`,
:func:`write_table7`: ``weight_pruning.md``, ``results.md``, ...), with the same ``◆`` mark.

Usage::

    # record a finished run (an --output_dir of image_classification.py holding one or more runs)
    python examples/image_tables.py record outputs/cifar10-cpu-l1 --into results/image_classification/cifar10-cpu/records

    # build every table from the recorded runs
    python examples/image_tables.py build results/image_classification/cifar10-cpu/records \\
        --output_dir results/image_classification/cifar10-cpu
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

RECORD_FORMAT = "hf-tdrop-image-run"
SWEEP_KEYS = ("weight", "weight_bn", "unit", "unit_bn")
MARK = "◆"
MARK_NOTE = (f"{MARK} marks a targeted-dropout run's γ (the fraction it was trained to lose) in its own pruning "
             "mode: such a model is meant to be pruned at or above its γ.")

# The paper's ResNet-32 / CIFAR-10 numbers (Gomez et al., 2019), test accuracy in %. Keys: the
# column's method, as image_classification.py's run specs name it (see `paper_key`).
PAPER_WEIGHT = {  # Table 2 (unpruned, 90 % weight pruning) and Table 6 (ramped TD, Smallify)
    "none": (93.71, 14.63), "dropout:weight:0.25": (93.62, 10.05), "weight:0.5:0.5": (93.03, 28.27),
    "weight:0.33:0.75": (89.88, 27.04), "weight:0.66:0.75": (92.64, 67.58), "weight:0.75:0.9": (92.53, 92.48),
    "vd": (92.09, 15.16), "l1:0.1": (92.80, 21.08), "l0:weight:0.1": (88.83, 12.55),
    "weight:0.99:0.99:ramp": (None, 88.97), "smallify:1e-05": (None, None),
}
PAPER_UNIT = {  # Table 3 (50 % unit pruning) and Table 6
    "none": (None, 12.63), "dropout:unit:0.25": (None, 9.97), "unit:0.5:0.5": (None, 88.41),
    "unit:0.33:0.75": (None, 28.88), "unit:0.66:0.75": (None, 84.86), "unit:0.9:0.75": (None, 90.05),
    "vd": (None, 65.79), "l1:0.01": (None, 26.72), "l0:unit:0.01": (None, 15.04),
    "unit:0.99:0.99:ramp": (None, None), "smallify:0.0001": (None, None),
}
PAPER_TABLE7 = {"weight": (0.9, 90.66, 92.51), "unit": (0.9, 84.98, 86.45)}  # level, random before, ramped TD after
PAPER_RAMPED_UNIT_90 = 85.99  # Table 6: ramped unit TD at 90 % unit pruning
COMPARISON_LEVEL = {"weight": 0.9, "unit": 0.5}


@dataclass
class RunRecord:
    """One trained run: what it is, its numbers and its cost (one JSON file)."""

    name: str
    spec: str
    label: str
    kind: str
    method: Optional[str]
    mode: Optional[str]
    alpha: float
    gamma: float
    unpruned: dict
    sweeps: dict = field(default_factory=dict)  # key in SWEEP_KEYS -> SweepResult dict
    train: dict = field(default_factory=dict)  # runtime, steps, seconds per step, epochs
    setting: dict = field(default_factory=dict)  # flags that differ between runs (lr, epochs, base model...)
    machine: str = ""

    def to_dict(self) -> dict:
        return {"format": RECORD_FORMAT, **self.__dict__}

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"not a run record (expected 'format': {RECORD_FORMAT!r})")
        return cls(**{k: v for k, v in data.items() if k != "format"})

    @property
    def finetuned(self) -> bool:
        return bool(self.setting.get("model_name_or_path"))

    def accuracy(self, key: str, level: float) -> Optional[float]:
        sweep = self.sweeps.get(key)
        if sweep is None:
            return None
        for s, value in zip(sweep["sparsities"], sweep["metrics"]["accuracy"]):
            if abs(s - level) < 1e-9:
                return value
        return None


def paper_key(record: RunRecord) -> str:
    """The record's spec in the form the paper tables are keyed by (numbers as ``%g``)."""
    parts = record.spec.split(":")
    out = []
    for p in parts:
        try:
            out.append(f"{float(p):g}")
        except ValueError:
            out.append(p)
    key = ":".join(out)
    return "vd" if key.startswith("vd") or key.startswith("variational") else key


# ------------------------------------------------------------------------------------------- record


def _machine() -> str:
    import os

    threads = os.environ.get("OMP_NUM_THREADS", "default")
    return f"{platform.machine()} {os.cpu_count()}-core CPU, {platform.system()}, OMP_NUM_THREADS={threads}"


def record_runs(output_dir: Path, into: Path, machine: Optional[str] = None, resumed_at_step: int = 0) -> list[Path]:
    """Write one record per run of an ``image_classification.py`` output folder; returns the paths.

    ``resumed_at_step``: the step of the checkpoint the training process resumed from (its
    ``train_runtime`` covers the steps after it only), so seconds per step are those of that leg."""
    summary = json.loads((output_dir / "run_summary.json").read_text(encoding="utf-8"))
    args = summary.get("args", {})
    written = []
    into.mkdir(parents=True, exist_ok=True)
    for run in summary["runs"]:
        name = run["name"]
        run_dir = output_dir / name
        if name not in summary.get("unpruned", {}):
            raise SystemExit(f"run {name!r} in {output_dir} has no sweep yet (still training?)")
        sweeps = {}
        for key in SWEEP_KEYS:
            path = run_dir / f"sweep-{key}.json"
            if path.is_file():
                sweeps[key] = json.loads(path.read_text(encoding="utf-8"))
        train = dict(summary.get("train_metrics", {}).get(name, {}))
        state = run_dir / "trainer_state.json"
        if state.is_file():
            steps = json.loads(state.read_text(encoding="utf-8")).get("global_step")
            train["steps"] = steps
            if resumed_at_step:
                if not steps or not 0 < resumed_at_step < steps:
                    raise SystemExit(f"--resumed_at_step {resumed_at_step}: must be between 0 and the run's "
                                     f"{steps} steps.")
                train["resumed_at_step"] = resumed_at_step
            if steps and train.get("train_runtime"):
                train["seconds_per_step"] = train["train_runtime"] / (steps - resumed_at_step)
        setting = {k: args.get(k) for k in ("model_name_or_path", "learning_rate", "num_train_epochs",
                                             "method_learning_rate", "validation_fraction", "sweep_split", "seed")}
        record = RunRecord(name=name, spec=run["spec"], label=run["label"], kind=run["kind"], method=run["method"],
                           mode=run["mode"], alpha=run["alpha"], gamma=run["gamma"],
                           unpruned=summary["unpruned"][name], sweeps=sweeps, train=train, setting=setting,
                           machine=machine or _machine())
        path = into / f"{name}.json"
        path.write_text(json.dumps(record.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path)
    return written


METHOD_ORDER = ("none", "dropout", "targeted_dropout", "random_target", "variational_dropout", "l1", "l0", "smallify")


def _order(record: RunRecord) -> tuple:
    method = record.method or record.kind
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (record.finetuned, record.kind == "randinit", rank, record.mode or "", record.spec)


def load_records(runs_dir: Path) -> list[RunRecord]:
    """Every record of a folder, in table order (none, dropout, targeted dropout, ..., fine-tuned last)."""
    records = [RunRecord.from_dict(json.loads(p.read_text(encoding="utf-8"))) for p in runs_dir.glob("*.json")]
    return sorted(records, key=_order)


# -------------------------------------------------------------------------------------------- build


def _cell(value: Optional[float], scale: float = 100.0) -> str:
    return "-" if value is None else f"{scale * value:.2f}"


def sweep_table(records: list[RunRecord], key: str) -> str:
    """Markdown: rows = fraction pruned, one column per run; ``◆`` marks a TD run's γ in its mode."""
    mode = key.partition("_")[0]
    columns = [r for r in records if key in r.sweeps]
    if not columns:
        return ""
    levels = sorted({s for r in columns for s in r.sweeps[key]["sparsities"]})
    head = "| prune % | " + " | ".join(_column_label(r, key) for r in columns) + " |"
    rows = [head, "|---" + "|---:" * len(columns) + "|"]
    for level in levels:
        cells = []
        for r in columns:
            value = r.accuracy(key, level)
            mark = f" {MARK}" if r.method == "targeted_dropout" and r.mode == mode and abs(r.gamma - level) < 1e-9 else ""
            cells.append(_cell(value) + mark)
        rows.append(f"| {level:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _column_label(record: RunRecord, key: str) -> str:
    method = record.sweeps[key].get("method", "magnitude")
    label = record.label + (" (fine-tuned)" if record.finetuned else "")
    return label if method == "magnitude" else f"{label} ({method})"


def comparison_table(records: list[RunRecord], mode: str) -> str:
    """The paper's comparison at its level: one row per run swept in ``mode`` (from scratch)."""
    level = COMPARISON_LEVEL[mode]
    paper = PAPER_WEIGHT if mode == "weight" else PAPER_UNIT
    rows = [f"| method | paper, unpruned | paper, {level:.0%} {mode} pruning | unpruned | {level:.0%}, as pruned | "
            f"{level:.0%}, BatchNorm re-estimated |", "|---|---:|---:|---:|---:|---:|"]
    for r in records:  # the paper's columns for this table: runs trained for this mode, or mode-free methods
        if r.finetuned or r.kind == "randinit" or mode not in r.sweeps or r.mode not in (None, mode):
            continue
        p_unpruned, p_level = paper.get(paper_key(r), (None, None))
        rows.append(f"| {r.label}{' (' + r.sweeps[mode]['method'] + ')' if r.sweeps[mode]['method'] != 'magnitude' else ''}"
                    f" | {'-' if p_unpruned is None else f'{p_unpruned:.2f}'} | {'-' if p_level is None else f'{p_level:.2f}'}"
                    f" | {_cell(r.unpruned['unpruned']['accuracy'])} | {_cell(r.accuracy(mode, level))}"
                    f" | {_cell(r.accuracy(mode + '_bn', level))} |")
    return "\n".join(rows)


def table7(records: list[RunRecord]) -> str:
    """Random pruning before training vs. pruning after training (none and ramped TD) at the same level."""
    parts = []
    for mode, (level, p_random, p_ramped) in PAPER_TABLE7.items():
        randinit = [r for r in records if r.kind == "randinit" and r.mode == mode]
        after = [r for r in records if not r.finetuned and r.kind != "randinit" and mode in r.sweeps
                 and (r.kind == "none" or (r.method == "targeted_dropout" and r.mode == mode))]
        if not randinit and not after:
            continue
        rows = [f"| {mode} sparsity {level:.0%} | paper | measured, as pruned | measured, BatchNorm re-estimated |",
                "|---|---:|---:|---:|"]
        for r in randinit:
            zero = r.unpruned.get("pruned_fraction", r.unpruned.get("zero_fraction"))
            rows.append(f"| random pruning before training ({zero:.1%} zero) | {p_random:.2f} | "
                        f"{_cell(r.unpruned['unpruned']['accuracy'])} | (trained pruned) |")
        for r in after:
            paper = f"{p_ramped:.2f}" if r.spec.endswith(":ramp") else "-"
            rows.append(f"| {r.label}, pruned after training | {paper} | {_cell(r.accuracy(mode, level))} | "
                        f"{_cell(r.accuracy(mode + '_bn', level))} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def finetune_table(records: list[RunRecord]) -> str:
    """Targeted dropout as a fine-tuning step vs. the same targeting trained from scratch."""
    tuned = [r for r in records if r.finetuned and (r.setting.get("sweep_split") or "test") == "test"]
    if not tuned:
        return ""
    rows = ["| run | epochs | lr | unpruned | pruned at the comparison level (BatchNorm re-estimated) | "
            "from scratch at that level | training time |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in tuned:
        level = COMPARISON_LEVEL[r.mode]
        scratch = next((s for s in records if not s.finetuned and s.spec.split(":")[:3] == r.spec.split(":")[:3]), None)
        minutes = r.train.get("train_runtime", 0) / 60
        rows.append(f"| {r.label} | {r.setting.get('num_train_epochs'):g} | {r.setting.get('learning_rate'):g} | "
                    f"{_cell(r.unpruned['unpruned']['accuracy'])} | {level:.0%}: {_cell(r.accuracy(r.mode + '_bn', level))} | "
                    f"{'-' if scratch is None else _cell(scratch.accuracy(r.mode + '_bn', level))} | {minutes:.0f} min |")
    return "\n".join(rows)


def cost_table(records: list[RunRecord]) -> str:
    rows = ["| run | steps | seconds per step | training wall time | machine |", "|---|---:|---:|---:|---|"]
    for r in records:
        sps = r.train.get("seconds_per_step")
        resumed = r.train.get("resumed_at_step")
        wall = f"{r.train.get('train_runtime', 0) / 60:.0f} min"
        if resumed:  # the process that finished the run timed its own steps only
            wall += f" (steps {resumed}–{r.train.get('steps')}, resumed)"
        rows.append(f"| {r.label}{' (fine-tuned)' if r.finetuned else ''} | {r.train.get('steps', '-')} | "
                    f"{'-' if sps is None else f'{sps:.2f}'} | {wall} | {r.machine} |")
    return "\n".join(rows)


def build(records: list[RunRecord], output_dir: Path, plot: bool = True) -> str:
    """Write ``comparison.md`` (every table) and one plot per sweep key; returns the Markdown."""
    records = [r for r in records if (r.setting.get("sweep_split") or "test") == "test"]
    output_dir.mkdir(parents=True, exist_ok=True)
    scratch = [r for r in records if not r.finetuned]
    parts = ["# CIFAR-10: targeted dropout against every baseline\n",
             f"{MARK} marks a targeted-dropout run's γ (the fraction it was trained to lose) in its own pruning mode.\n"]
    for mode in ("weight", "unit"):
        parts.append(f"## {mode.capitalize()} pruning: the paper's comparison at {COMPARISON_LEVEL[mode]:.0%}\n\n"
                     + comparison_table(scratch, mode) + "\n")
    for key in SWEEP_KEYS:
        mode, _, protocol = key.partition("_")
        how = "BatchNorm statistics re-estimated at every level" if protocol else "as pruned"
        text = sweep_table(records, key)
        if text:
            parts.append(f"## {mode.capitalize()} pruning, {how}: test accuracy (%)\n\n{text}\n")
            if plot:
                _plot(records, key, output_dir / f"comparison_{key}.png", f"{mode} pruning, {how}")
    text = table7(scratch)
    if text:
        parts.append("## Table 7: random pruning before training vs. pruning after training (%)\n\n" + text + "\n")
    text = finetune_table(records)
    if text:
        parts.append("## Targeted dropout as a fine-tuning step (%)\n\n" + text + "\n")
    parts.append("## Cost of every run\n\n" + cost_table(records) + "\n")
    markdown = "\n".join(parts)
    (output_dir / "comparison.md").write_text(markdown, encoding="utf-8")
    return markdown


# ------------------------------------------------------------------- one invocation's tables


CRITERIA_NOTE = ("Pruning criterion: magnitude (smallest |w| per w_o in weight pruning, smallest ||w_o|| in unit "
                 "pruning) unless the column names a learned one: (gates) = L0's learned log α, lowest first; "
                 "(log_alpha) = variational dropout's log α, highest first. A learned criterion is used only in "
                 "the mode it was learned in (per-weight gates and log α in weight pruning, per-unit gates in unit "
                 "pruning).")
MODES_ORDER = ("weight", "unit")


def gamma_cells(results: list, runs: Optional[list], mode: str) -> set[tuple[int, int]]:
    """``(row, column)`` of the cells to mark in a combined table of ``results`` (its columns, rows =
    the sorted union of their levels): each targeted-dropout run's γ, in its own pruning ``mode``."""
    levels = sorted({s for r in results for s in r.sparsities})
    cells = set()
    for j, result in enumerate(results):
        spec = next((s for s in runs or () if s.label == result.run_name), None)
        if spec is None or spec.method != "targeted_dropout" or spec.mode != mode:
            continue
        cells.update((i, j) for i, level in enumerate(levels) if abs(level - spec.gamma) < 1e-9)
    return cells


def mark_markdown(markdown: str, cells: set[tuple[int, int]]) -> str:
    """A Markdown table (the library's padded ``| prune % | run | ...`` layout, any lines above it
    kept) with :data:`MARK` after the value of each ``(row, column)`` of ``cells``, re-padded."""
    if not cells:
        return markdown
    lines = markdown.rstrip("\n").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = [[c.strip() for c in line.strip()[1:-1].split(" | ")] for line in lines[start:]]
    header, rule, body = rows[0], rows[1], rows[2:]
    for i, j in cells:
        body[i][j + 1] += f" {MARK}"
    right = [r.endswith(":") and not r.startswith(":") for r in rule]
    widths = [max(4, *(len(r[k]) for r in (header, *body))) for k in range(len(header))]

    def line(cells_):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells_, widths, right)) + " |"

    rule_line = "| " + " | ".join("-" * (w - 1) + ":" if r else ":" + "-" * (w - 1)
                                  for w, r in zip(widths, right)) + " |"
    return "\n".join([*lines[:start], line(header), rule_line, *(line(r) for r in body)]) + "\n"


def write_combined(output_dir: Path, sweeps: dict[str, list], labels: Optional[list[str]] = None,
                   unpruned: Optional[dict] = None, runs: Optional[list] = None) -> dict[str, str]:
    """The tables of one ``image_classification.py`` invocation. Combined tables (rows = prune %,
    columns = runs, labelled with their pruning criterion when it is not magnitude; each
    targeted-dropout run's γ marked with :data:`MARK` in its own mode) per pruning mode and protocol
    (``weight``, ``weight_bn`` = BatchNorm re-estimated at every level, ...): .md/.csv/.json and a
    .png; plus, in ``results.md``, every run's unpruned accuracy as saved and with its targeted set
    removed, and the Table 7 comparison when there are randinit runs (also ``table7.md/.csv/.json``).
    ``sweeps``: ``{key: [SweepResult, ...]}``; ``runs``: the run specs (``run_specs.RunSpec``)."""
    from hf_tdrop import combine_sweeps, plot_sweeps  # torch: only when tables are written

    written = {}
    texts = []
    if unpruned and runs:
        rows = ["| run | unpruned, as saved | weights already zero | targeted set removed (reference eval) |",
                "|---|---|---|---|"]
        for spec in runs:
            numbers = unpruned.get(spec.name)
            if numbers is None:
                continue
            removed = numbers.get("targeted_set_removed")
            zero = numbers.get("zero_fraction")
            rows.append(f"| {spec.label} | {numbers['unpruned']['accuracy']:.4f} | "
                        f"{'-' if zero is None else format(zero, '.1%')} | "
                        f"{'-' if removed is None else format(removed['accuracy'], '.4f')} |")
        texts.append("### Unpruned test accuracy\n\n" + "\n".join(rows) + "\n")
    for key, results in sweeps.items():
        if not results:
            continue
        mode, _, protocol = key.partition("_")
        how = ", BatchNorm statistics re-estimated at every level" if protocol == "bn" else ", as pruned"
        columns = [r.run_name for r in results]
        table = combine_sweeps(results, "accuracy", labels=columns)
        stem = output_dir / f"{key}_pruning"
        cells = gamma_cells(results, runs, mode)
        note = f"\n{CRITERIA_NOTE}\n" + (f"\n{MARK_NOTE}\n" if cells else "")
        text = f"### {mode.capitalize()} pruning{how}: test accuracy (rows = fraction pruned, columns = runs)\n\n" \
               + mark_markdown(table.to_markdown(float_format=".4f"), cells) + "\n" + note
        stem.with_suffix(".md").write_text(text, encoding="utf-8")
        table.to_csv(stem.with_suffix(".csv"))
        table.to_json(stem.with_suffix(".json"))
        (output_dir / f"{key}_pruning_criteria.json").write_text(
            json.dumps({r.run_name: r.method for r in results}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        plot_sweeps(results, stem.with_suffix(".png"), metric="accuracy", labels=columns,
                    title=f"{mode} pruning{how}")
        written[key] = str(stem.with_suffix(".md"))
        texts.append(text)
    if unpruned and runs and any(s.kind == "randinit" for s in runs):
        text = write_table7(output_dir, unpruned, runs)
        written["table7"] = str(output_dir / "table7.md")
        texts.append(text)
    (output_dir / "results.md").write_text("\n".join(texts), encoding="utf-8")
    return written


def write_table7(output_dir: Path, unpruned: dict, runs: list) -> str:
    """The paper's Table 7 for one invocation: random pruning before training (each randinit run,
    evaluated as trained) vs. the no-method and targeted-dropout runs magnitude-pruned after training
    at the same level. Writes ``table7.md``, ``table7.csv`` (mode, sparsity, one column per run) and
    ``table7.json``; returns the Markdown."""
    data, parts = {}, []
    for mode in MODES_ORDER:
        randinit = {s.sparsity: unpruned[s.name] for s in runs if s.kind == "randinit" and s.mode == mode
                    and s.name in unpruned}
        if not randinit:
            continue
        levels = sorted(randinit)
        columns = {"random pruning before training": [randinit[level]["unpruned"]["accuracy"] for level in levels]}
        for spec in runs:
            after = unpruned.get(spec.name, {}).get("pruned_after_training", {}).get(mode)
            if after is not None:
                columns[f"{spec.label}, pruned after training"] = [after.get(str(level)) for level in levels]
        data[mode] = {"sparsities": levels, "columns": columns,
                      "random_init_pruned_fraction": [randinit[level]["pruned_fraction"] for level in levels]}
        names = list(columns)
        rows = [f"| {mode} sparsity | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for i, level in enumerate(levels):
            cells = ["-" if columns[n][i] is None else f"{columns[n][i]:.4f}" for n in names]
            rows.append(f"| {level:.0%} | " + " | ".join(cells) + " |")
        parts.append("\n".join(rows))
    text = ("### Table 7: random pruning before training vs. pruning after training (test accuracy)\n\n"
            "Random pruning before training: a random subnetwork (per w_o in weight mode, per layer in unit "
            "mode) is pruned at initialisation and held at exactly zero throughout training. The other "
            "columns are trained dense and magnitude-pruned to the same level afterwards.\n\n"
            + "\n\n".join(parts) + "\n")
    (output_dir / "table7.md").write_text(text, encoding="utf-8")
    (output_dir / "table7.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(output_dir / "table7.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        for mode, table in data.items():
            writer.writerow(["mode", "sparsity", *table["columns"]])
            for i, level in enumerate(table["sparsities"]):
                writer.writerow([mode, level, *(table["columns"][n][i] for n in table["columns"])])
    return text



def _plot(records: list[RunRecord], key: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        if key in r.sweeps:
            sweep = r.sweeps[key]
            ax.plot([100 * s for s in sweep["sparsities"]], [100 * a for a in sweep["metrics"]["accuracy"]],
                    marker="o", markersize=3, label=_column_label(r, key))
    ax.set_xlabel("fraction pruned (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record the runs of an image_classification.py --output_dir")
    rec.add_argument("output_dir", type=Path)
    rec.add_argument("--into", type=Path, required=True, help="folder of run records")
    rec.add_argument("--machine", default=None, help="machine description (default: read from this one)")
    rec.add_argument("--resumed_at_step", type=int, default=0,
                     help="step of the checkpoint the run was resumed from: its time per step is the last leg's")
    bld = sub.add_parser("build", help="build every table from a folder of run records")
    bld.add_argument("runs_dir", type=Path)
    bld.add_argument("--output_dir", type=Path, required=True)
    bld.add_argument("--no_plot", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "record":
        if not (args.output_dir / "run_summary.json").is_file():
            parser.error(f"output_dir {args.output_dir}: no run_summary.json (not a finished image_classification.py run)")
        for path in record_runs(args.output_dir, args.into, args.machine, args.resumed_at_step):
            print(path)
    else:
        records = load_records(args.runs_dir)
        if not records:
            parser.error(f"runs_dir {args.runs_dir}: no run records (*.json)")
        print(build(records, args.output_dir, plot=not args.no_plot))


if __name__ == "__main__":
    sys.exit(main())
