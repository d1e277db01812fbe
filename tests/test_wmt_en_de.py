"""End-to-end tests of examples/wmt_en_de.py on a few hundred real Multi30K pairs (../shared/data)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, require_shared_data, run_script_in_fresh_python as fresh_python

sys.path.insert(0, str(REPO_ROOT / "examples"))
import translation_eval  # noqa: E402
import translation_presets  # noqa: E402
import wmt_en_de  # noqa: E402

import hf_tdrop  # noqa: E402

SCRIPT = REPO_ROOT / "examples" / "wmt_en_de.py"
LEVELS = ["0", "0.5", "0.9"]


def data_args(n_train=300, n_eval=12):
    d = require_shared_data("multi30k")
    return ["--train_files", str(d / "train.en.gz"), str(d / "train.de.gz"),
            "--validation_files", str(d / "val.en.gz"), str(d / "val.de.gz"),
            "--max_train_samples", str(n_train), "--max_eval_samples", str(n_eval)]


def small_args(out, steps=4, *extra):
    return [*data_args(), "--model_preset", "tiny", "--vocab_size", "300", "--per_device_train_batch_size", "16",
            "--per_device_eval_batch_size", "8", "--max_train_steps", str(steps), "--max_source_length", "24",
            "--max_target_length", "12", "--logging_steps", "1", "--num_beams", "2", "--eval_splits", "validation",
            "--sweep_sparsities", *LEVELS, "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def td_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wmt") / "td"
    wmt_en_de.main(small_args(out, 4, "--td_mode", "weight", "--td_alpha", "0.66", "--td_gamma", "0.75"))
    return out


def test_end_to_end_files_and_metrics(td_run):
    out = td_run
    for name in ("tokenizer.json", "config.json", "model.safetensors", "args.json", "train_history.json", "results.json"):
        assert (out / name).is_file(), name
    history = json.loads((out / "train_history.json").read_text())
    assert history["completed_steps"] == 4 and [h["step"] for h in history["history"]] == [1, 2, 3, 4]
    assert all(h["alpha"] == 0.66 and h["gamma"] == 0.75 for h in history["history"])  # constant schedule
    # the tokenizer was trained on the data and saved with the model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) <= 300 and tok.decode(tok("Ein Hund läuft.").input_ids, skip_special_tokens=True) == "Ein Hund läuft."
    # sweep tables / plot written, one row per level, BLEU and token accuracy at each
    for ext in ("md", "csv", "json", "png"):
        assert (out / "sweeps" / f"sweep-validation-weight.{ext}").is_file()
    sweep = json.loads((out / "sweeps" / "sweep-validation-weight.json").read_text())
    assert sweep["sparsities"] == [0.0, 0.5, 0.9] and sweep["run_name"] == "targeted α=0.66 γ=0.75"
    assert set(sweep["metrics"]) == {"bleu", "token_accuracy"}
    assert all(0.0 <= v <= 100.0 for v in sweep["metrics"]["bleu"])
    assert all(0.0 <= v <= 1.0 for v in sweep["metrics"]["token_accuracy"])
    assert sweep["pruned_fraction"][0] == 0.0 and 0.85 < sweep["pruned_fraction"][2] <= 0.9
    results = json.loads((out / "results.json").read_text())
    assert results["sweeps"]["validation-weight"]["sacrebleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert results["sweeps"]["validation-weight"]["n_sentences"] == 12
    # translations saved per level, in the split's order, next to source and reference
    for pct in ("00", "50", "90"):
        lines = (out / "translations" / f"validation-weight-{pct}.tsv").read_text(encoding="utf-8").splitlines()
        assert lines[0] == "source\treference\thypothesis" and len(lines) == 13
        assert lines[1].split("\t")[:2] == ["A group of men are loading cotton onto a truck",
                                            "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"]


def test_saved_model_is_plain_and_unpruned_and_eval_only_reproduces_bleu(td_run, tmp_path):
    """The checkpoint is written before the sweep (unpruned, no hf-tdrop class inside), and re-evaluating
    it with --no-do_train gives the same metrics at each level (the sweep restored the weights)."""
    from safetensors.torch import load_file

    weights = load_file(td_run / "model.safetensors")
    w = weights["model.encoder.layers.0.fc1.weight"]
    assert (w == 0).float().mean() < 0.05
    out = tmp_path / "eval"
    wmt_en_de.main([*data_args(), "--no-do_train", "--model_name_or_path", str(td_run), "--num_beams", "2",
                    "--max_source_length", "24", "--max_target_length", "12", "--per_device_eval_batch_size", "8",
                    "--eval_splits", "validation", "--sweep_sparsities", *LEVELS, "--run_name", "again",
                    "--output_dir", str(out)])
    first = json.loads((td_run / "sweeps" / "sweep-validation-weight.json").read_text())["metrics"]
    again = json.loads((out / "sweeps" / "sweep-validation-weight.json").read_text())["metrics"]
    assert again["token_accuracy"] == pytest.approx(first["token_accuracy"], abs=1e-6)
    assert again["bleu"] == pytest.approx(first["bleu"], abs=1e-6)


def test_generation_budget_follows_the_longest_source_and_caps_hypotheses(td_run, tmp_path):
    from types import SimpleNamespace

    budget = SimpleNamespace(max_length_a=1.5, max_length_b=10, max_target_length=128)
    mask = torch.tensor([[1] * 7 + [0] * 3, [1] * 10])
    assert translation_eval.generation_budget(mask, budget) == 25  # floor(1.5 * 10) + 10
    assert translation_eval.generation_budget(mask, SimpleNamespace(max_length_a=20.0, max_length_b=10,
                                                                    max_target_length=128)) == 128
    # through the pipeline: a budget of 3 new tokens bounds every hypothesis at every level
    from transformers import AutoTokenizer

    out = tmp_path / "short"
    wmt_en_de.main([*data_args(), "--no-do_train", "--model_name_or_path", str(td_run), "--num_beams", "2",
                    "--max_source_length", "24", "--max_target_length", "12", "--per_device_eval_batch_size", "8",
                    "--eval_splits", "validation", "--sweep_sparsities", "0", "0.9", "--max_length_a", "0",
                    "--max_length_b", "3", "--output_dir", str(out)])
    tok = AutoTokenizer.from_pretrained(td_run)
    lengths = []
    for pct in ("00", "90"):
        rows = (out / "translations" / f"validation-weight-{pct}.tsv").read_text(encoding="utf-8").splitlines()[1:]
        lengths += [len(tok(text_target=row.split("\t")[2], add_special_tokens=False).input_ids) for row in rows]
    assert len(lengths) == 24 and max(lengths) <= 3 and max(lengths) > 0
    default_rows = (td_run / "translations" / "validation-weight-90.tsv").read_text(encoding="utf-8").splitlines()[1:]
    full = [len(tok(text_target=row.split("\t")[2], add_special_tokens=False).input_ids) for row in default_rows]
    assert max(full) > 3  # the default budget lets the same model generate longer hypotheses


def test_combine_runs_writes_paper_tables(td_run, tmp_path):
    wmt_en_de.main(["--combine_runs", str(td_run), str(td_run), "--output_dir", str(tmp_path)])
    table = json.loads((tmp_path / "table-validation-weight-bleu.json").read_text())
    assert table["sparsities"] == [0.0, 0.5, 0.9] and len(table["columns"]) == 2
    assert (tmp_path / "table-validation-weight-bleu.md").read_text().count("\n") >= 4
    assert (tmp_path / "plot-validation-weight.png").is_file()


def test_combine_runs_skips_a_sweep_some_runs_lack(td_run, tmp_path, caplog):
    """A sweep only some runs have (here: a unit sweep) is left out with a warning; the rest is combined."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(td_run / "sweeps", other / "sweeps")
    unit = json.loads((other / "sweeps" / "sweep-validation-weight.json").read_text())
    unit["mode"] = "unit"
    (other / "sweeps" / "sweep-validation-unit.json").write_text(json.dumps(unit))
    out = tmp_path / "tables"
    with caplog.at_level("WARNING"):
        wmt_en_de.main(["--combine_runs", str(td_run), str(other), "--output_dir", str(out)])
    assert "sweep-validation-unit: only 1 of 2 runs have it; skipped" in caplog.text
    assert (out / "table-validation-weight-bleu.json").is_file()
    assert not (out / "table-validation-unit-bleu.json").exists()


@pytest.mark.parametrize("batching", [[], ["--max_tokens_per_batch", "96"]], ids=["sentences", "tokens"])
def test_resume_continues_the_same_schedule(tmp_path, batching):
    ramp = ["--td_mode", "weight", "--td_schedule", "linear", "--td_ramp_steps", "4", "--no-do_sweep", *batching]
    full = tmp_path / "full"
    wmt_en_de.main(small_args(full, 4, *ramp))
    part = tmp_path / "part"
    wmt_en_de.main(small_args(part, 4, *ramp, "--checkpointing_steps", "2"))
    assert (part / "step_2").is_dir() and (part / "step_4").is_dir()
    resumed = tmp_path / "resumed"
    wmt_en_de.main(small_args(resumed, 4, *ramp, "--resume_from_checkpoint", str(part / "step_2")))
    hist_full = json.loads((full / "train_history.json").read_text())["history"]
    hist_res = json.loads((resumed / "train_history.json").read_text())["history"]
    # the resumed run does only updates 3 and 4, with the schedule's α/γ at those steps
    assert [h["step"] for h in hist_res] == [3, 4]
    assert [(h["alpha"], h["gamma"]) for h in hist_res] == [(h["alpha"], h["gamma"]) for h in hist_full[2:]]
    assert hist_res[-1]["alpha"] == 0.66 and hist_res[-1]["gamma"] == 0.75
    assert hist_full[0]["alpha"] == pytest.approx(0.66 / 4)  # linear ramp: α(1) = α_t / 4
    assert [h["lr"] for h in hist_res] == [h["lr"] for h in hist_full[2:]]  # LR schedule resumed too
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), "resumed training diverged from the full run"


def test_presets_set_the_training_defaults_and_flags_override_them():
    base = ["--train_files", "a.en", "a.de", "--output_dir", "o"]
    args = wmt_en_de.parse_args([*base, "--model_preset", "multi30k"])
    assert (args.vocab_size, args.max_tokens_per_batch, args.num_train_epochs) == (5000, 2048, 12)
    assert (args.learning_rate, args.num_warmup_steps) == (1e-3, 400)
    args = wmt_en_de.parse_args([*base, "--model_preset", "multi30k", "--vocab_size", "4000", "--learning_rate", "5e-4"])
    assert (args.vocab_size, args.learning_rate, args.max_tokens_per_batch) == (4000, 5e-4, 2048)
    args = wmt_en_de.parse_args([*base, "--model_preset", "tiny"])
    assert args.max_tokens_per_batch is None and args.vocab_size == 8000  # sentence batches
    # fine-tuning a checkpoint: no preset applies
    args = wmt_en_de.parse_args([*base, "--model_preset", "multi30k", "--model_name_or_path", "runs/none"])
    assert (args.learning_rate, args.num_warmup_steps, args.max_tokens_per_batch, args.num_train_epochs) == (
        5e-5, 0, None, 1)
    model = wmt_en_de.build_model(wmt_en_de.parse_args([*base, "--model_preset", "multi30k"]), _Tok(5000))
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_ffn_dim, c.encoder_attention_heads) == (
        192, 3, 3, 768, 4)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # shared embeddings
    assert sum(p.numel() for p in model.parameters()) * 2 < 10e6  # float16 checkpoint under 10 MB


class _Tok:
    """The three things build_model reads from a tokenizer."""

    def __init__(self, n):
        self.n, self.pad_token_id, self.eos_token_id = n, 0, 1

    def __len__(self):
        return self.n


def test_token_batches_float16_save_and_epoch_validation(tmp_path):
    """Length batching, one validation entry per epoch, a float16 checkpoint whose re-evaluation
    reproduces the run's own sweep exactly (the sweep measured the rounded weights)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    common = ["--max_source_length", "24", "--max_target_length", "12", "--per_device_eval_batch_size", "8",
              "--num_beams", "2", "--eval_splits", "validation", "--sweep_sparsities", *LEVELS]
    wmt_en_de.main([*data_args(120), "--model_preset", "tiny", "--vocab_size", "300", "--max_tokens_per_batch", "160",
                    "--num_train_epochs", "2", "--save_dtype", "float16", "--td_mode", "weight", "--logging_steps", "1",
                    *common, "--output_dir", str(out)])
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float16}
    history = json.loads((out / "train_history.json").read_text())
    per_epoch = history["epoch_validation"]
    assert [e["epoch"] for e in per_epoch] == [0, 1]
    assert per_epoch[1]["step"] == history["completed_steps"] == 2 * per_epoch[0]["step"]
    assert 120 / 16 < per_epoch[0]["step"] < 120 / 4  # batches of ~10 pairs (160 tokens / <=24 each)
    assert all(e["validation_nll"] < e["validation_loss"] < 10 and 0 <= e["validation_token_accuracy"] <= 1
               for e in per_epoch)
    again = tmp_path / "again"
    wmt_en_de.main([*data_args(), "--no-do_train", "--model_name_or_path", str(out), *common, "--output_dir", str(again)])
    first = json.loads((out / "sweeps" / "sweep-validation-weight.json").read_text())["metrics"]
    second = json.loads((again / "sweeps" / "sweep-validation-weight.json").read_text())["metrics"]
    assert second == first


def run_error(capsys, args):
    """Run main(args) expecting a bad-input stop: returns the stderr text (exit status 2 checked)."""
    with pytest.raises(SystemExit) as exc:
        wmt_en_de.main(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (["--validation_files", "/nonexistent/v.en", "/nonexistent/v.de"],
     "wmt_en_de.py: error: --validation_files: file not found: '/nonexistent/v.en'."),
    (["--source_lang", "fr"],
     "wmt_en_de.py: error: --train_files: the file names say languages ['en', 'de'] but --source_lang/--target_lang "
     "are 'fr'/'de'."),
    (["--eval_splits", "test"],
     "wmt_en_de.py: error: --eval_splits test: the data has only ['train', 'validation']"),
    (["--td_mode", "weight", "--td_target_modules", "no_such_layer"], "wmt_en_de.py: error: --td_target_modules: "),
])
def test_bad_data_stops_before_anything_is_written(tmp_path, capsys, bad, message):
    out = tmp_path / "o"
    err = run_error(capsys, small_args(out, 1) + bad)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), err
    assert not out.exists()


def test_mismatched_line_counts_cli(tmp_path, capsys):
    d = require_shared_data("multi30k")
    short = tmp_path / "short.de"
    short.write_text("Ein Hund.\n", encoding="utf-8")
    err = run_error(capsys, small_args(tmp_path / "o", 1, "--validation_files", str(d / "val.en.gz"), str(short)))
    assert err.startswith("wmt_en_de.py: error: --validation_files: parallel files have different line counts: ")
    assert str(short) in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad, message", [
    (["--checkpointing_steps", "x"], "--checkpointing_steps must be a positive integer or 'epoch', got 'x'."),
    (["--resume_from_checkpoint", "no/such/state"], "--resume_from_checkpoint: no such folder 'no/such/state'."),
    (["--resume_from_checkpoint", "latest"], "--resume_from_checkpoint latest: no step_*/epoch_* folder in "),
    (["--no-do_train"], "--no-do_train needs --model_name_or_path"),
    (["--max_train_samples", "0"], "--max_train_samples must be >= 1, got 0."),
    (["--td_schedule", "linear"], "--td_schedule linear needs exactly one of --td_ramp_fraction / --td_ramp_steps."),
    (["--sweep_sparsities", "0.5", "0.5"], "--sweep_sparsities must be distinct"),
    (["--max_tokens_per_batch", "0"], "--max_tokens_per_batch must be >= 1, got 0."),
    (["--max_length_a", "-1"], "--max_length_a and --max_length_b must be >= 0, got -1.0 and 10."),
])
def test_bad_flags_one_line_exit_2(tmp_path, capsys, bad, message):
    out = tmp_path / "o"
    args = ["--train_files", "a.en", "a.de", "--output_dir", str(out), *bad]  # flags are checked before the data
    err = run_error(capsys, args)
    assert err.startswith("wmt_en_de.py: error: " + message) and err.count("\n") == 1, err
    assert not out.exists()


def test_combine_runs_of_unfinished_run_is_a_flag_error(tmp_path, capsys):
    err = run_error(capsys, ["--combine_runs", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "t")])
    assert err.startswith("wmt_en_de.py: error: --combine_runs: no sweeps/sweep-*.json in ")
    assert not (tmp_path / "t").exists()


def test_missing_files_from_the_shell(tmp_path):
    """The command line a user types: one line on stderr, exit status 2, no traceback, nothing written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--train_files", "/nonexistent.en", "/nonexistent.de",
                           "--output_dir", "o"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["wmt_en_de.py: error: --train_files: file not found: '/nonexistent.en'."]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_shows_a_cpu_example_and_real_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        wmt_en_de.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "python examples/wmt_en_de.py --model_preset multi30k" in text and "about 45 minutes on 2 cores" in text
    assert "(default: None)" not in text
    assert "Pruning modes to sweep. (default: ['weight'])" in " ".join(text.split())


def test_accelerate_launch_two_processes(tmp_path):
    require_shared_data("multi30k")
    out = tmp_path / "ddp"
    # In accelerate 1.15 `launch --cpu --num_processes 2` starts ONE process (several CPU processes need
    # mpirun); `--multi_gpu` + ACCELERATE_USE_CPU=1 starts 2 torchrun workers on gloo (MULTI_CPU).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO_ROOT), "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
           *small_args(out, 2, "--td_mode", "weight", "--sweep_sparsities", "0", "0.9")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "train_history.json").read_text())
    assert history["num_processes"] == 2 and history["completed_steps"] == 2
    sweep = json.loads((out / "sweeps" / "sweep-validation-weight.json").read_text())
    assert sweep["sparsities"] == [0.0, 0.9]
    # 12 validation sentences sharded over 2 processes and gathered back: each exactly once, in order
    lines = (out / "translations" / "validation-weight-00.tsv").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 13 and lines[1].startswith("A group of men are loading cotton onto a truck\t")


def test_checkpoint_saves_hide_the_shard_progress_bar(tmp_path, capsys):
    """save_pretrained's "Writing model shards" bar is off inside the block and the setting comes back."""
    import transformers

    from conftest import tiny_marian

    logging_utils = transformers.utils.logging
    assert logging_utils.is_progress_bar_enabled()
    with wmt_en_de.no_transformers_progress_bars():
        assert not logging_utils.is_progress_bar_enabled()
        tiny_marian().save_pretrained(tmp_path / "m")
    assert logging_utils.is_progress_bar_enabled()
    assert "Writing model shards" not in capsys.readouterr().err
    logging_utils.disable_progress_bar()
    try:  # already off: stays off
        with wmt_en_de.no_transformers_progress_bars():
            pass
        assert not logging_utils.is_progress_bar_enabled()
    finally:
        logging_utils.enable_progress_bar()


@pytest.mark.parametrize("run, levels", [("none", ["0"]), ("ft75", ["0", "0.7"])])
def test_committed_multi30k_models_reproduce_their_translations(run, levels, tmp_path):
    """The committed float16 checkpoints, evaluated by the pipeline unchanged, give the committed
    translations of Multi30K test 2016 (first 24 sentences, beam 4): unpruned, and 70 % weight-pruned
    for the fine-tuned model, which still translates there. (The unregularised model babbles at 70 %
    up to the generation budget, which follows the longest source of its batch, so its hypotheses
    there depend on which sentences share a batch.) Batches differ from the full run's (other
    padding), so a couple of beam ties may differ."""
    model_dir = REPO_ROOT / "results" / "wmt_en_de" / "m30k" / "models" / run
    d = require_shared_data("multi30k")
    out = tmp_path / run
    wmt_en_de.main(["--no-do_train", "--model_name_or_path", str(model_dir), "--num_beams", "4",
                    "--test_files", str(d / "test_2016_flickr.en.gz"), str(d / "test_2016_flickr.de.gz"),
                    "--max_test_samples", "24", "--eval_splits", "test", "--sweep_sparsities", *levels,
                    "--output_dir", str(out)])
    committed_dir = REPO_ROOT / "results" / "wmt_en_de" / "m30k" / "translations" / run
    for pct in (f"{round(float(level) * 100):02d}" for level in levels):
        ours = (out / "translations" / f"test-weight-{pct}.tsv").read_text(encoding="utf-8").splitlines()[1:]
        committed = (committed_dir / f"test2016-weight-{pct}.tsv").read_text(encoding="utf-8").splitlines()[1:25]
        assert [row.split("\t")[:2] for row in ours] == [row.split("\t")[:2] for row in committed]
        same = sum(a.split("\t")[2] == b.split("\t")[2] for a, b in zip(ours, committed))
        assert same >= 22, (run, pct, same)


# --------------------------------------------------------------------------------------------------
# the command line: one spelling per flag in --help, short lines, answers before the heavy imports
# --------------------------------------------------------------------------------------------------

HEAVY_MODULES = ("torch", "datasets", "accelerate", "hf_tdrop", "translation_data", "run_specs")


def run_script_in_fresh_python(argv, cwd):
    return fresh_python(SCRIPT, argv, cwd, HEAVY_MODULES)


def test_help_shows_one_spelling_per_flag_in_short_lines_without_heavy_imports(tmp_path):
    """--help lists every flag once, in its snake_case spelling (HfArgumentParser also registers a
    kebab-case alias), wraps at 100 columns even in a wide terminal, and comes before torch, datasets,
    accelerate or hf_tdrop are imported."""
    code, text, err, heavy = run_script_in_fresh_python(["--help"], tmp_path)
    assert code == 0 and err == "", err
    assert heavy == [], f"--help imported {heavy}"
    long_lines = [line for line in text.splitlines() if len(line) > 100]
    assert not long_lines, long_lines
    for action in wmt_en_de.build_parser()._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        first = action.option_strings[0]
        assert re.search(rf"^\s+{re.escape(first)}\b", text, re.M), f"{first} is not listed"
        if first.startswith("--") and "_" in first:
            kebab = "--" + first[2:].replace("_", "-")
            assert kebab in action.option_strings and kebab not in text, kebab
    assert "--no_do_train                 Same as --do_train false." in text


def test_flag_errors_come_before_the_heavy_imports(tmp_path):
    code, out, err, heavy = run_script_in_fresh_python(["--td_alpha", "2", "--output_dir", "o"], tmp_path)
    assert code == 2 and err == "wmt_en_de.py: error: --td_alpha must be in [0, 1], got 2.0.", err
    assert heavy == [], f"a flag error imported {heavy}"
    code, out, err, heavy = run_script_in_fresh_python(["--td-mode", "bogus", "--output-dir", "o"], tmp_path)
    assert code == 2 and err.startswith("wmt_en_de.py: error: argument --td_mode/--td-mode: invalid choice: 'bogus'")
    assert heavy == [] and not list(tmp_path.iterdir())


def test_help_starts_with_the_scripts_own_summary():
    assert wmt_en_de.__doc__.split("\n\n")[0].strip() == translation_presets.DESCRIPTION


def test_kebab_case_spellings_are_still_accepted():
    args = wmt_en_de.parse_args(["--td-mode", "unit", "--no-do-train", "--model-name-or-path", "runs/x",
                                 "--output-dir", "o", "--sweep-sparsities", "0", "0.5", "--no-do_sweep",
                                 "--lr-scheduler-type", "constant"])
    assert (args.td_mode, args.do_train, args.model_name_or_path, args.output_dir) == ("unit", False, "runs/x", "o")
    assert args.sweep_sparsities == [0.0, 0.5] and args.do_sweep is False and args.lr_scheduler_type == "constant"


def test_flag_choices_spelled_out_for_fast_parsing_match_the_libraries():
    from transformers import SchedulerType

    assert translation_presets.MODES == tuple(hf_tdrop.MODES)
    assert translation_presets.SCHEDULE_KINDS == tuple(hf_tdrop.SCHEDULE_KINDS)
    assert translation_presets.LR_SCHEDULER_TYPES == tuple(t.value for t in SchedulerType)
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in translation_presets.SAVE_DTYPES)


# --------------------------------------------------------------------------------------------------
# noise: checkpoints of tied weights, the Hub's data set while offline
# --------------------------------------------------------------------------------------------------


def test_checkpoints_do_not_warn_about_tied_weights(tmp_path, caplog):
    """accelerate's save_state warns "Removed shared tensor ..." for the tied embeddings / output head
    of a Marian model; save_training_state keeps that expected warning out, and the state reloads."""
    from accelerate import Accelerator

    from conftest import tiny_marian

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(tiny_marian())
    assert {"model.shared.weight", "lm_head.weight"} <= wmt_en_de.tied_tensor_names(model)
    with caplog.at_level("WARNING"):
        accelerator.save_state(str(tmp_path / "plain"))
    assert "Removed shared tensor" in caplog.text  # what the script used to print at every checkpoint
    caplog.clear()
    with caplog.at_level("WARNING"):
        wmt_en_de.save_training_state(accelerator, model, tmp_path / "quiet")
    assert "Removed shared tensor" not in caplog.text and "while reloading" not in caplog.text
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    accelerator.load_state(str(tmp_path / "quiet"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.model.shared.weight  # still tied


def test_tied_weights_notice_lets_other_removed_tensors_through(caplog):
    import logging

    from conftest import tiny_marian

    accelerate_logger = logging.getLogger("accelerate.utils.other")
    with caplog.at_level("WARNING"), wmt_en_de.quiet_tied_weights_notice(tiny_marian()):
        accelerate_logger.warning("Removed shared tensor {'lm_head.weight', 'model.encoder.embed_tokens.weight'} "
                                  "while saving. This should be OK")
        accelerate_logger.warning("Removed shared tensor {'model.encoder.layers.0.fc1.weight'} while saving.")
        accelerate_logger.warning("something else")
    assert "lm_head.weight" not in caplog.text
    assert "model.encoder.layers.0.fc1.weight" in caplog.text and "something else" in caplog.text
    assert not accelerate_logger.filters  # removed after the block


@pytest.fixture
def hub_unreachable(monkeypatch, tmp_path):
    """Online mode, with the Hub at a local port that refuses connections and an empty cache."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return tmp_path


def test_hub_data_set_while_offline_fails_at_once(hub_unreachable, capsys):
    """Without network (and without HF_HUB_OFFLINE), the default --dataset_name wmt14 used to spend
    about half a minute in retries before its error; one lookup now decides."""
    import time

    from translation_data import load_translation_splits

    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"Couldn't reach 'wmt14' on the Hub \(.+\) and it is not in the local cache"):
        load_translation_splits(dataset_name="wmt14", dataset_config_name="de-en",
                                cache_dir=str(hub_unreachable / "datasets-cache"))
    assert time.perf_counter() - start < 10  # 23 s of retries before
    out = hub_unreachable / "o"
    err = run_error(capsys, ["--output_dir", str(out)])
    assert err.startswith("wmt_en_de.py: error: --dataset_name wmt14: Couldn't reach 'wmt14' on the Hub (")
    assert err.count("\n") == 1 and "Give local files with --train_files" in err
    assert not out.exists()


def test_unreachable_hub_still_reads_a_cached_data_set(monkeypatch):
    """When the lookup finds no Hub, the data set comes from the local cache (offline mode for that
    one call), as `datasets` would after its retries."""
    import datasets
    from huggingface_hub import constants

    import translation_data

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(translation_data, "hub_lookup_error", lambda name: "ConnectError: refused")
    seen = []

    def cached_load_dataset(name, config_name, cache_dir=None):
        seen.append((name, config_name, constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE))
        return datasets.DatasetDict({"test": datasets.Dataset.from_dict(
            {"translation": [{"en": "A dog.", "de": "Ein Hund."}]})})

    monkeypatch.setattr(datasets, "load_dataset", cached_load_dataset)
    raw = translation_data.load_translation_splits(dataset_name="wmt14", dataset_config_name="de-en")
    assert seen == [("wmt14", "de-en", True, True)]
    assert raw["test"][0]["translation"] == {"en": "A dog.", "de": "Ein Hund."}
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False  # restored
