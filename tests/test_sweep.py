"""prune_sweep, SweepResult files, combine_sweeps tables and plot_sweeps PNGs."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
from torch import nn

from conftest import tiny_bert, tiny_inputs
from hf_tdrop import (SweepResult, SweepTable, combine_sweeps, patch_model, plot_sweeps, prune_model,
                      prune_sweep)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _bits(t):
    return t.detach().contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def _snapshot(model):
    return {k: _bits(v).clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(_bits(state[k]), v), k


def make_evaluate(name="bert", calls=None):
    inputs = tiny_inputs(name, batch=4)

    def evaluate(model):
        if calls is not None:
            calls.append(1)
        model.eval()
        with torch.no_grad():
            out = model(**inputs)
        return {"loss": out.loss.item(), "logit_sum": out.logits.sum().item()}

    return evaluate


@pytest.fixture(scope="module")
def bert_sweep():
    torch.manual_seed(0)
    model = tiny_bert()
    result = prune_sweep(model, make_evaluate(), (0.0, 0.5, 0.9), mode="weight", run_name="none", progress=False)
    return model, result


def test_sweep_matches_pruning_a_copy_at_each_level_and_leaves_model_unchanged():
    model = tiny_bert()
    model.train()
    model.bert.embeddings.eval()                     # mixed train/eval flags must come back as they were
    flags = {n: m.training for n, m in model.named_modules()}
    before = _snapshot(model)
    evaluate = make_evaluate()
    levels = (0.0, 0.3, 0.6, 0.9)
    result = prune_sweep(model, evaluate, levels, mode="unit", run_name="none", progress=False)

    _assert_unchanged(model, before)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert (result.run_name, result.mode, result.method) == ("none", "unit", "magnitude")
    assert result.sparsities == list(levels) and set(result.metrics) == {"loss", "logit_sum"}
    for i, s in enumerate(levels):
        twin = copy.deepcopy(model)
        report = prune_model(twin, s, mode="unit")
        expected = evaluate(twin)
        assert result.metrics["loss"][i] == expected["loss"], s
        assert result.metrics["logit_sum"][i] == expected["logit_sum"], s
        assert result.pruned_fraction[i] == report.pruned_fraction
    assert result.metrics["loss"][0] == evaluate(copy.deepcopy(model))["loss"]
    assert len(set(result.metrics["loss"])) == len(levels)   # pruning really changed the model


def test_sweep_restores_model_when_evaluate_raises():
    model = tiny_bert()
    model.train()
    before = _snapshot(model)
    calls = []

    def evaluate(m):
        calls.append(1)
        m.eval()
        if len(calls) == 2:
            raise RuntimeError("evaluation failed")
        return 1.0

    with pytest.raises(RuntimeError, match="evaluation failed"):
        prune_sweep(model, evaluate, (0.0, 0.5, 0.7), progress=False)
    assert len(calls) == 2
    _assert_unchanged(model, before)
    assert all(m.training for m in model.modules())


def test_scalar_metric_default_run_name_and_patched_model():
    model = tiny_bert()
    plain = copy.deepcopy(model)
    patch_model(model, alpha=0.66, gamma=0.75)
    evaluate = make_evaluate()
    result = prune_sweep(model, lambda m: evaluate(m)["loss"], (0.0, 0.5), progress=False)
    assert result.run_name == "targeted α=0.66 γ=0.75"
    assert list(result.metrics) == ["metric"]
    reference = prune_sweep(plain, lambda m: evaluate(m)["loss"], (0.0, 0.5), progress=False)
    assert reference.run_name == "model"
    assert result.metrics["metric"] == reference.metrics["metric"]    # eval(): patched computes as unpatched


def test_sweep_of_a_patched_model_prunes_only_its_patched_layers():
    """A model trained with targeted dropout on its FFNs only: the sweep's levels prune exactly those
    layers (as prune_model does), not the attention; explicit targets still win."""
    model = tiny_bert()
    patch_model(model, alpha=0.5, gamma=0.5, mode="unit", target_modules="intermediate.dense")
    seen = []

    def evaluate(m):
        seen.append(sorted(n for n, p in m.named_parameters() if n.endswith(".weight") and "embeddings" not in n
                           and (p == 0).any()))
        return 0.0

    result = prune_sweep(model, evaluate, (0.5,), mode="unit", progress=False)
    assert seen == [[f"bert.encoder.layer.{i}.intermediate.dense.weight" for i in range(2)]]
    assert result.pruned_fraction == [0.5]
    prune_sweep(model, evaluate, (0.5,), mode="unit", target_modules="query", progress=False)
    assert seen[-1] == [f"bert.encoder.layer.{i}.attention.self.query.weight" for i in range(2)]
    with pytest.raises(ValueError, match="exclude_modules"):
        prune_sweep(model, evaluate, (0.5,), exclude_modules="intermediate.dense", progress=False)


def test_random_sweep_is_reproducible_and_differs_from_magnitude():
    model = tiny_bert()
    evaluate = make_evaluate()
    kw = dict(method="random", progress=False)
    a = prune_sweep(model, evaluate, (0.5,), generator=torch.Generator().manual_seed(3), **kw)
    b = prune_sweep(model, evaluate, (0.5,), generator=torch.Generator().manual_seed(3), **kw)
    mag = prune_sweep(model, evaluate, (0.5,), progress=False)
    assert a.metrics == b.metrics and a.method == "random"
    assert a.metrics["loss"] != mag.metrics["loss"]


def test_progress_bar_is_shown(capsys):
    prune_sweep(tiny_bert(), lambda m: 0.0, (0.0, 0.5), run_name="bar-run", progress=True)
    err = capsys.readouterr().err
    assert "prune sweep [bar-run]" in err and "2/2" in err


def test_inconsistent_or_invalid_metrics_are_rejected():
    model = tiny_bert()
    before = _snapshot(model)
    returns = iter([{"a": 1.0}, {"b": 2.0}])
    with pytest.raises(ValueError, match="same names"):
        prune_sweep(model, lambda m: next(returns), (0.0, 0.5), progress=False)
    for bad in ("high", None, {"sparsity": 1.0}, {}, {"acc": [1.0]}, True):
        with pytest.raises(ValueError, match="evaluate_fn"):
            prune_sweep(model, lambda m, bad=bad: bad, (0.1,), progress=False)
    _assert_unchanged(model, before)


BAD_SWEEP_ARGS = [
    ({"evaluate_fn": 3}, "evaluate_fn"), ({"sparsities": []}, "sparsities"), ({"sparsities": [0.5, 0.5]}, "sparsities"),
    ({"sparsities": [0.0, 1.0]}, "sparsities"), ({"sparsities": "0.5"}, "sparsities"), ({"sparsities": [True]}, "sparsities"),
    ({"mode": "rows"}, "mode"), ({"method": "taylor"}, "method"), ({"run_name": ""}, "run_name"),
    ({"progress": "yes"}, "progress"), ({"target_modules": "nope"}, "target_modules"),
    ({"exclude_modules": ".*"}, "exclude_modules"), ({"generator": 1}, "generator"),
]


@pytest.mark.parametrize("kwargs,name", BAD_SWEEP_ARGS)
def test_bad_sweep_arguments_raise_before_anything_runs(kwargs, name):
    model = tiny_bert()
    before = _snapshot(model)
    calls = []
    args = {"evaluate_fn": make_evaluate(calls=calls), "sparsities": (0.0, 0.5), "progress": False, **kwargs}
    evaluate_fn, sparsities = args.pop("evaluate_fn"), args.pop("sparsities")
    with pytest.raises(ValueError, match=name):
        prune_sweep(model, evaluate_fn, sparsities, **args)
    assert calls == []
    _assert_unchanged(model, before)


# --------------------------------------------------------------------------------------------- files


def test_save_writes_markdown_csv_json_png_that_parse_back(bert_sweep, tmp_path):
    _, result = bert_sweep
    paths = result.save(tmp_path / "out")
    assert {k: p.name for k, p in paths.items()} == {
        "markdown": "sweep-none.md", "csv": "sweep-none.csv", "json": "sweep-none.json", "png": "sweep-none.png"}

    assert SweepResult.from_json(paths["json"]) == result

    with paths["csv"].open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["sparsity", "loss", "logit_sum", "pruned_fraction"]
    assert [float(r[0]) for r in rows[1:]] == result.sparsities
    assert [float(r[1]) for r in rows[1:]] == result.metrics["loss"]            # full precision
    assert [float(r[2]) for r in rows[1:]] == result.metrics["logit_sum"]
    assert [float(r[3]) for r in rows[1:]] == result.pruned_fraction

    md = paths["markdown"].read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert [c.strip() for c in table[0].strip("|").split("|")] == ["prune %", "loss", "logit_sum"]
    assert len(table) == 2 + 3
    for line, s, loss in zip(table[2:], result.sparsities, result.metrics["loss"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == f"{100 * s:g}%" and cells[1] == f"{loss:.4f}"

    _assert_png(paths["png"])
    assert result.to_markdown(metric="loss").count("|") == 3 * 5
    with pytest.raises(ValueError, match="metric"):
        result.to_markdown(metric="bleu")
    with pytest.raises(ValueError, match="prefix"):
        result.save(tmp_path, prefix="a/b")
    assert sorted(p.name for p in result.save(tmp_path / "noplot", prefix="s", plot=False).values()) == [
        "s.csv", "s.json", "s.md"]
    assert not (tmp_path / "noplot" / "s.png").exists()
    with pytest.raises(ValueError, match="sweep result"):
        SweepResult.from_json(combine_sweeps([result], "loss").to_json(tmp_path / "table.json"))


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0                               # not a blank canvas


def test_sweep_result_validates_its_fields():
    ok = dict(run_name="r", mode="weight", method="magnitude", sparsities=[0.0, 0.5], metrics={"acc": [1.0, 0.5]})
    SweepResult(**ok)
    for change, name in [({"metrics": {"acc": [1.0]}}, "acc"), ({"sparsities": [0.0, 1.0]}, "sparsities"),
                         ({"sparsities": [0.5, 0.5]}, "sparsities"), ({"mode": "x"}, "mode"), ({"method": "x"}, "method"), ({"run_name": ""}, "run_name"),
                         ({"metrics": {}}, "metrics"), ({"metrics": {"sparsity": [1.0, 2.0]}}, "metrics")]:
        with pytest.raises(ValueError, match=name):
            SweepResult(**{**ok, **change})


# ---------------------------------------------------------------------------------- combined tables


def _run(name, sparsities, accs, mode="weight"):
    return SweepResult(run_name=name, mode=mode, method="magnitude", sparsities=sparsities,
                       metrics={"accuracy": accs, "loss": [1.0 - a for a in accs]})


def test_combine_sweeps_lays_runs_out_like_the_paper(tmp_path):
    none = _run("none", [0.0, 0.5, 0.9], [0.91, 0.60, 0.10])
    td = _run("targeted α=0.66 γ=0.75", [0.9, 0.0, 0.5], [0.85, 0.92, 0.90])   # any order of levels
    table = combine_sweeps([none, td], "accuracy")
    assert isinstance(table, SweepTable)
    assert table.columns == ["none", "targeted α=0.66 γ=0.75"]
    assert table.sparsities == [0.0, 0.5, 0.9]
    assert table.values == [[0.91, 0.92], [0.60, 0.90], [0.10, 0.85]]

    md = table.to_markdown(float_format=".2f").splitlines()
    assert md[0] == "**accuracy**"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md if line.startswith("|")]
    assert rows[0] == ["prune %", "none", "targeted α=0.66 γ=0.75"]
    assert rows[2:] == [["0%", "0.91", "0.92"], ["50%", "0.60", "0.90"], ["90%", "0.10", "0.85"]]

    with table.to_csv(tmp_path / "t.csv").open(newline="", encoding="utf-8") as f:
        csv_rows = list(csv.reader(f))
    assert csv_rows[0] == ["sparsity", "none", "targeted α=0.66 γ=0.75"]
    assert [[float(x) for x in r] for r in csv_rows[1:]] == [[0.0, 0.91, 0.92], [0.5, 0.6, 0.9], [0.9, 0.1, 0.85]]
    assert SweepTable.from_json(table.to_json(tmp_path / "t.json")) == table
    assert json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["metric"] == "accuracy"

    loss = combine_sweeps([none, td], "loss", labels=["baseline", "TD"])
    assert loss.columns == ["baseline", "TD"] and loss.values[1] == [pytest.approx(0.4), pytest.approx(0.1)]


def test_combine_sweeps_missing_levels_and_bad_input():
    a = _run("a", [0.0, 0.5], [0.9, 0.8])
    b = _run("b", [0.0, 0.3], [0.7, 0.6])
    table = combine_sweeps([a, b], "accuracy")
    assert table.sparsities == [0.0, 0.3, 0.5]
    assert table.values == [[0.9, 0.7], [None, 0.6], [0.8, None]]
    assert "| 30%" in table.to_markdown() and "–" in table.to_markdown()
    with pytest.raises(ValueError, match="metric"):
        combine_sweeps([a, b], "bleu")
    with pytest.raises(ValueError, match="metric"):
        combine_sweeps([a, b])                               # two shared metrics: must choose
    with pytest.raises(ValueError, match="distinct"):
        combine_sweeps([a, _run("a", [0.0], [0.1])], "accuracy")
    with pytest.raises(ValueError, match="labels"):
        combine_sweeps([a, b], "accuracy", labels=["only one"])
    with pytest.raises(ValueError, match="results"):
        combine_sweeps([], "accuracy")
    with pytest.raises(ValueError, match="results"):
        combine_sweeps([a, {"run_name": "b"}], "accuracy")
    with pytest.raises(ValueError, match="float_format"):
        table.to_markdown(float_format="%d")


def test_combine_real_sweeps_and_plot(bert_sweep, tmp_path):
    model, none = bert_sweep
    td = prune_sweep(model, make_evaluate(), (0.0, 0.5, 0.9), mode="unit", run_name="unit", progress=False)
    table = combine_sweeps([none, td], "loss")
    assert table.values == [[x, y] for x, y in zip(none.metrics["loss"], td.metrics["loss"])]
    assert table.values[0][0] == table.values[0][1]          # 0 % is the unpruned model in both
    path = plot_sweeps([none, td], tmp_path / "loss.png", "loss", title="tiny BERT")
    assert path == tmp_path / "loss.png"
    _assert_png(path)
    _assert_png(plot_sweeps([none, td], tmp_path / "all.png"))     # one panel per shared metric
    with pytest.raises(ValueError, match="metric"):
        plot_sweeps([none, td], tmp_path / "x.png", "bleu")
    assert not (tmp_path / "x.png").exists()
    assert not any(math.isnan(v) for v in none.metrics["loss"])


def test_nm_sweep_levels_are_group_fractions_up_to_the_full_pattern():
    from hf_tdrop import check_nm_sparsity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    seen = []

    def evaluate(m):
        seen.append(check_nm_sparsity(m, n=1, m=4, target_modules=["0", "2"]).ok)
        return 0.0

    result = prune_sweep(model, evaluate, [0.0, 0.5, 1.0], mode="nm", n=1, m=4, target_modules=["0", "2"],
                         progress=False)
    assert seen == [False, False, True]  # only the full pattern is exactly 1:4
    assert result.sparsities == [0.0, 0.5, 1.0]
    assert result.pruned_fraction[2] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="sparsities"):
        prune_sweep(model, evaluate, [1.0], mode="weight", progress=False)
