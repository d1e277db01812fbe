"""examples/sparsity_finetune.py on a short schedule: tables written, pruned weights still zero."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "examples"))
import sparsity_finetune as sf  # noqa: E402


def test_short_run_writes_tables_and_keeps_every_pruned_weight_zero(tmp_path):
    result = sf.main(["--output_dir", str(tmp_path), "--seeds", "0", "--epochs", "2", "--finetune_epochs", "1"])
    assert [r["run"].split()[0] for r in result["experiment_a"]] == ["none", "N:M"]
    assert all(r["nm_exact"] and r["pruned_fraction"] == 0.5 for r in result["experiment_a"])
    rows = {r["pruning"]: r for r in result["experiment_b"]}
    assert set(rows) == {"weight 90%", "N:M 2:4"}
    for row in rows.values():
        assert row["revived_pruned_weights"] == 0 and row["nonzero_held"] == 0 and row["pruned_weights"] > 0
    # floor(0.9 * 64) of 64 and floor(0.9 * 256) of 256 weights per unit, in 256 units each
    assert rows["weight 90%"]["pruned_weights"] == 256 * 57 + 256 * 230
    assert rows["N:M 2:4"]["nm_exact"] is True
    md = (tmp_path / "results.md").read_text()
    assert "## (a)" in md and "## (b)" in md and "| weight 90% | 0 |" in md
    assert json.loads((tmp_path / "results.json").read_text())["args"]["seeds"] == [0]


@pytest.mark.parametrize("argv,message", [(["--epochs", "0"], "--epochs must be a positive integer"),
                                          (["--weight_sparsity", "1.0"], "--weight_sparsity must be in")])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        sf.main(argv)
    assert message in capsys.readouterr().err
