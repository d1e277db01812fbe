"""examples/causal_lm.py end to end on a tiny GPT-2 and a tiny Llama-style model (Multi30K English):
unit targeted dropout on the MLPs through Trainer, pruning, shrinking, reloading with stock
transformers, and the results files."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from conftest import REPO_ROOT, require_shared_data

sys.path.insert(0, str(REPO_ROOT / "examples"))
import causal_lm  # noqa: E402

HIDDEN, LAYERS = 32, 2
TINY = ["--hidden_size", str(HIDDEN), "--num_layers", str(LAYERS), "--num_heads", "2", "--vocab_size", "200",
        "--max_train_samples", "600", "--max_eval_samples", "100", "--block_size", "32", "--max_steps", "12",
        "--batch_size", "8", "--learning_rate", "3e-3", "--warmup_steps", "2", "--logging_steps", "4",
        "--latency_trials", "3", "--latency_warmup", "1", "--no_progress"]
MLP_WIDTH = {"gpt2": 4 * HIDDEN, "llama": 96}          # 96: 8/3 x 32 rounded up to a multiple of 32
UP_LAYERS = {"gpt2": [f"transformer.h.{i}.mlp.c_fc" for i in range(LAYERS)],
             "llama": [f"model.layers.{i}.mlp.up_proj" for i in range(LAYERS)]}
# parameters one MLP hidden unit holds: GPT-2 c_fc column + bias + c_proj row; Llama gate, up and down
PARAMS_PER_UNIT = {"gpt2": 2 * HIDDEN + 1, "llama": 3 * HIDDEN}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def finished(request, tmp_path_factory):
    """One tiny run of the script per model type: (model type, argv, output folder, returned results)."""
    data_dir = require_shared_data("multi30k", "train.en.gz").parents[1]
    out = tmp_path_factory.mktemp(f"causal_lm_{request.param}")
    argv = [*TINY, "--model_type", request.param, "--data_dir", str(data_dir), "--output_dir", str(out)]
    threads = torch.get_num_threads()
    results = causal_lm.main(argv)
    assert torch.get_num_threads() == threads          # --threads is undone on return
    return request.param, argv, out, results


def reload(out, run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = out / run / "shrunk"
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_results_files_report_every_field(finished):
    model_type, argv, out, results = finished
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results, default=str))
    assert set(results["runs"]) == {"targeted", "none"}
    assert results["command"].startswith("python examples/causal_lm.py ") and "--model_type " + model_type in results["command"]
    assert results["machine"]["torch_threads"] == 1 and results["machine"]["cpu_count"] >= 1
    assert results["data"]["eval_sentences"] == 100 and results["data"]["train_sentences"] == 600
    for run in results["runs"].values():
        assert set(run["perplexity"]) == {"before_pruning", "after_pruning", "after_shrinking"}
        assert all(math.isfinite(p) and p > 1.0 for p in run["perplexity"].values())
        assert run["perplexity"]["before_pruning"] < results["data"]["vocab_size"]   # it learned: below uniform
        for key in ("params", "file_bytes", "mlp_width"):
            assert set(run[key]) == {"before_shrinking", "after_shrinking"}
        for timing in run["latency_ms"].values():
            assert timing["median"] > 0 and timing["trials"] == 3 and timing["batch"] == [8, 32]
        assert run["training"]["steps"] == 12 and math.isfinite(run["training"]["train_loss"])
    md = (out / "results.md").read_text()
    for label in ("perplexity, trained (before pruning)", "perplexity, 50 % of MLP units pruned", "perplexity, shrunk",
                  "reloaded (`AutoModelForCausalLM`) vs shrunk", "parameters before → after shrinking",
                  "safetensors bytes before → after shrinking", "CPU latency, ms per forward of 8 × 32 tokens",
                  "unit TD α=0.66 γ=0.5", "no targeted dropout", "Command: `python examples/causal_lm.py",
                  "1 torch thread,", "Wall time"):
        assert label in md, label
    ppl = results["runs"]["targeted"]["perplexity"]
    assert f"| perplexity, shrunk | {ppl['after_shrinking']:.2f} |" in md


def test_targeted_run_trains_unit_targeted_dropout_on_the_mlps_only(finished):
    model_type, _, out, results = finished
    targeted, none = results["runs"]["targeted"]["training"], results["runs"]["none"]["training"]
    assert none["targeted_dropout"] is None and none["patched_layers"] == []
    td = targeted["targeted_dropout"]
    assert (td["mode"], td["alpha"], td["gamma"]) == ("unit", 0.66, 0.5)
    assert td["target_modules"] == [causal_lm.MLP_TARGETS[model_type]]
    assert targeted["patched_layers"] == UP_LAYERS[model_type]          # no attention layer, no head
    schedule = td["extra"]["schedule"]                                  # ramped over the first half of 12 steps
    assert (schedule["kind"], schedule["ramp_steps"]) == ("linear", 6)
    saved = json.loads((out / "targeted" / "shrunk" / "tdrop_config.json").read_text())
    assert saved["pruning"]["mode"] == "unit" and saved["pruning"]["layers"] == UP_LAYERS[model_type]
    assert saved["targeted_dropout"]["mode"] == "unit"
    assert json.loads((out / "none" / "shrunk" / "tdrop_config.json").read_text())["targeted_dropout"] is None


def test_shrinking_removes_half_of_the_mlp_units_and_leaves_attention_alone(finished):
    from hf_tdrop import sparsity_report

    model_type, _, out, results = finished
    width = MLP_WIDTH[model_type]
    field = causal_lm.MLP_WIDTH_FIELD[model_type]
    for name, run in results["runs"].items():
        assert run["pruned_layers"] == UP_LAYERS[model_type]
        assert run["pruned_units"] == LAYERS * width // 2
        assert run["mlp_width"] == {"before_shrinking": width, "after_shrinking": width // 2}
        removed = run["params"]["before_shrinking"] - run["params"]["after_shrinking"]
        assert removed == LAYERS * (width // 2) * PARAMS_PER_UNIT[model_type]
        assert run["file_bytes"]["after_shrinking"] < run["file_bytes"]["before_shrinking"]
        assert run["attention_zero_units"] == 0

        model, _ = reload(out, name)
        assert getattr(model.config, field) == width // 2
        assert sum(p.numel() for p in model.parameters()) == run["params"]["after_shrinking"]
        attention = sparsity_report(model, target_modules=[causal_lm.ATTENTION_LAYERS[model_type]])
        assert attention.layers and attention.total["zero_units"] == 0 and attention.total["zero_weights"] == 0
        for layer in attention.layers:                                  # full width: nothing pruned, nothing cut
            assert HIDDEN in layer.shape and min(layer.shape) == HIDDEN
        mlp = sparsity_report(model, target_modules=[causal_lm.MLP_TARGETS[model_type]])
        assert [layer.n_units for layer in mlp.layers] == [width // 2] * LAYERS
        assert mlp.total["zero_units"] == 0                             # every pruned unit was removed


def test_perplexity_after_shrinking_equals_perplexity_after_pruning(finished):
    _, _, _, results = finished
    for run in results["runs"].values():
        ppl = run["perplexity"]
        assert ppl["after_shrinking"] == pytest.approx(ppl["after_pruning"], rel=1e-5)
        assert run["shrunk_vs_pruned_max_abs_logit_diff"] < 1e-4


def test_shrunk_model_reloads_with_stock_automodel_and_gives_the_same_outputs(finished):
    model_type, argv, out, results = finished
    args = causal_lm.parse_args([*argv, "--overwrite_output_dir"])
    for name, run in results["runs"].items():
        assert run["reloaded_class"] == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[model_type]
        assert run["reloaded_vs_shrunk_max_abs_logit_diff"] == 0.0     # same weights, same code: bit for bit
        # independently: reload the folder (model and its tokenizer) and recompute the held-out perplexity
        model, tokenizer = reload(out, name)
        _, eval_blocks = causal_lm.make_blocks(tokenizer, causal_lm.load_texts(args), args.block_size)
        assert len(eval_blocks) == results["data"]["eval_blocks"]
        assert causal_lm.perplexity(model, eval_blocks, args) == pytest.approx(run["perplexity"]["after_shrinking"],
                                                                               rel=1e-9)


def test_help_shows_the_real_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        causal_lm.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: gpt2)", "(default: 300)", "(default: 0.5)", "(default: 0.66)", "(default: 2000)",
                    "(default: multi30k/train.en.gz)", "(default: outputs/causal_lm)"):
        assert default in text, default


@pytest.mark.parametrize("argv,message", [(["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
                                          (["--hidden_size", "30", "--num_heads", "4"], "must be a multiple of"),
                                          (["--runs", "none", "none"], "--runs must not repeat")])
def test_bad_flags_stop_with_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        causal_lm.parse_args([*argv, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
