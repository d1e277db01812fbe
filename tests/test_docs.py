"""The README and the documentation pages: runnable examples run (the README's as a user runs it,
offline and without a Hub token), the guides' code blocks run, the translation commands parse, links
resolve, CI runs the README's commands, and the text speaks to users (no machine paths, no internal
issue numbers)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, SHARED_DATA
from docs_fixtures import FIXTURES

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
RUN_MARKER = "<!-- test: run -->"
CPU_INDEX_ADVICE = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
INSTALL_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[examples]"'
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
MAIN_JOB = 'pip install torch==2.13.0 && pip install -e ".[examples]" && python examples/image_classification.py'
GUIDE_PAGES = ("index.md", "sparsity.md", "guides/targeting.md", "guides/training.md", "guides/methods.md",
               "guides/pruning.md", "guides/shrinking.md", "guides/hub.md", "guides/cli.md", "guides/causal_lm.md")
"""Pages whose every code block is marked and checked. The markers (an HTML comment on the line
before the block, invisible on the site):

- ``<!-- test: run -->``: a python block executed, or a shell block run by bash, in order with the
  page's other runnable blocks, in one namespace and one scratch directory;
- ``<!-- test: run given NAME -->``: the same, for a fragment that uses names the page describes in
  words (``model``, ``trainer``, ...): ``docs_fixtures.FIXTURES[NAME]`` makes them on a tiny model;
- ``<!-- test: run with ARGS -->``: a command, run from the repository root with ARGS appended
  (a tiny model instead of a big one);
- ``<!-- test: run distributed given NAME -->``: a sharded-training block, run on 2 CPU processes;
- ``<!-- test: run on cuda given NAME -->``: run where a CUDA GPU is present, skipped elsewhere;
- ``<!-- test: output -->``: a ```text sample session: its ``$ `` command is run (after the page's
  blocks before it) and the lines shown must be printed, in order;
- ``<!-- test: excerpt of PATH -->``: the lines of a script that its own tests run;
- ``<!-- test: accelerate config -->``: an accelerate config file, read by accelerate;
- ``<!-- test: install -->``: one of the README's install commands."""


def code_blocks(text: str) -> list[tuple[str, str | None, str]]:
    """``(language, marker, code)`` of every fenced code block of a Markdown text; ``marker`` is the
    text of a ``<!-- test: ... -->`` comment on the line right before the block, or None."""
    pattern = r"(?:<!-- test: (?P<marker>[^\n]*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<code>.*?)```"
    return [(m.group("lang"), m.group("marker"), m.group("code")) for m in re.finditer(pattern, text, re.S)]


def python_blocks(text: str, marked_only: bool = True) -> list[str]:
    """The ```python blocks of a Markdown text; with ``marked_only``, those right after RUN_MARKER."""
    return [code for lang, marker, code in code_blocks(text)
            if lang == "python" and (marker == "run" or not marked_only)]


def doc_pages() -> list:
    return sorted(DOCS.rglob("*.md"))


# --------------------------------------------------------------------------------------------------
# the README
# --------------------------------------------------------------------------------------------------


def test_readme_examples_run(tmp_path, monkeypatch):
    """Every README block marked runnable, in one namespace, in a scratch directory, logged in to a
    stand-in Hub (no network): the optional push runs and uploads the saved folder."""
    uploads = stand_in_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, f"no python block of the README is marked {RUN_MARKER!r}"
    namespace = {"__name__": "__readme__"}
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102

    # what the end-to-end example promises
    sweep = namespace["sweep"]
    assert sweep.sparsities == pytest.approx([i / 10 for i in range(10)])
    assert sweep.metric_names() == ["accuracy"]
    saved = tmp_path / "bert-td-pruned"
    assert {"config.json", "model.safetensors", "tdrop_config.json", "README.md"} <= {p.name for p in saved.iterdir()}
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(saved)  # stock transformers, no patching
    weight = reloaded.bert.encoder.layer[0].intermediate.dense.weight
    assert 0.65 < (weight == 0).float().mean().item() <= 0.7
    assert uploads and uploads[0][0] == "your-name/bert-td-pruned" and "tdrop_config.json" in uploads[0][1]


def test_readme_example_runs_offline_without_a_hub_token(tmp_path):
    """The README's example as a user runs it, nothing stubbed: a script of its blocks, run by python
    offline and without any Hub token, ends normally; the optional push says it is skipped."""
    script = tmp_path / "readme_example.py"
    script.write_text("\n\n".join(python_blocks(README.read_text(encoding="utf-8"))), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert "Not logged in to the Hugging Face Hub (or offline): the push is skipped." in proc.stdout
    assert "| 90%" in proc.stdout  # the sweep table
    assert (tmp_path / "bert-td-pruned" / "tdrop_config.json").is_file()


def test_readme_python_blocks_compile():
    """Blocks not marked runnable (none today) must at least be valid Python."""
    for code in python_blocks(README.read_text(encoding="utf-8"), marked_only=False):
        compile(code, str(README), "exec")


def bash_commands(text: str) -> list[str]:
    return [code.strip() for lang, _, code in code_blocks(text) if lang == "bash"]


def test_ci_runs_the_readme_commands():
    """CI runs the README's test command verbatim and its main job with only an output folder added."""
    commands = bash_commands(README.read_text(encoding="utf-8"))
    assert TEST_COMMAND in commands and MAIN_JOB in commands
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert f'\n{TEST_COMMAND} 2>&1 | tee "$log"\n' in ci
    assert f'\n{MAIN_JOB} --output_dir "$scratch/image_classification"\n' in ci
    assert "mkdocs build --strict" in ci


def test_install_advice_gives_the_cpu_build_the_way_pytorch_does():
    """The README and the home page give the same install command and, for machines whose pip is not
    set up with a CPU wheel, PyTorch's CPU index; the README says how long the tests take."""
    readme = README.read_text(encoding="utf-8")
    home = (DOCS / "index.md").read_text(encoding="utf-8")
    for text in (readme, home):
        commands = bash_commands(text)
        assert commands[:2] == [INSTALL_COMMAND, CPU_INDEX_ADVICE]
        assert "CUDA build" in text and "PyTorch's own install instructions" in text
    assert re.search(r"The tests, about \d+ minutes on a 2-core CPU", readme)


# --------------------------------------------------------------------------------------------------
# the guides: every code block is checked (its fragments on tiny models)
# --------------------------------------------------------------------------------------------------


def marker_parts(marker: str) -> tuple[str, str | None]:
    """``(verb, fixture)`` of a marker: ``"run given bert_loop"`` -> ``("run", "bert_loop")``."""
    verb, _, given = marker.partition(" given ")
    return verb, (given or None)


def check_block_marker(page: str, lang: str, marker: str | None, code: str) -> None:
    assert marker is not None, f"{page}: a ```{lang} block has no <!-- test: ... --> marker:\n{code}"
    verb, given = marker_parts(marker)
    if given is not None:
        assert given in FIXTURES, f"{page}: unknown fixture {given!r} (known: {sorted(FIXTURES)})"
    if verb.startswith("run with "):
        assert lang == "bash" and given is None, f"{page}: 'run with' is for commands"
    elif verb == "run":
        assert lang in ("python", "bash"), f"{page}: 'run' is for python and bash blocks, not ```{lang}"
    elif verb in ("run distributed", "run on cuda"):
        assert lang == "python", f"{page}: {verb!r} is for python blocks"
    elif verb == "install":
        assert lang == "bash" and code.strip() in (INSTALL_COMMAND, CPU_INDEX_ADVICE), code
    elif verb == "output":
        assert lang == "text" and code.startswith("$ "), f"{page}: 'output' is a ```text block starting with '$ '"
    elif verb.startswith("excerpt of "):
        assert lang == "python" and (REPO_ROOT / verb[len("excerpt of "):]).is_file(), f"{page}: {marker!r}"
    elif verb == "accelerate config":
        assert lang == "yaml", f"{page}: {verb!r} is for yaml blocks"
    else:
        raise AssertionError(f"{page}: unknown marker {marker!r}")


@pytest.mark.parametrize("page", GUIDE_PAGES)
def test_every_code_block_of_the_guides_is_checked(page):
    blocks = code_blocks((DOCS / page).read_text(encoding="utf-8"))
    assert blocks, page
    for lang, marker, code in blocks:
        check_block_marker(page, lang, marker, code)


def test_the_marker_check_refuses_what_it_cannot_run():
    for lang, marker in [("python", None), ("python", "run with --tiny"), ("text", "run"), ("bash", "output"),
                         ("python", "run given no_such_fixture"), ("python", "excerpt of examples/nope.py"),
                         ("python", "compile")]:
        with pytest.raises(AssertionError):
            check_block_marker("page.md", lang, marker, "x = 1\n")


# what each page promises, checked after the block that contains the snippet (None: after the last)


def check_home(ns, cwd):
    from transformers import AutoModelForSequenceClassification

    from hf_tdrop import is_patched

    assert not is_patched(ns["model"])
    reloaded = AutoModelForSequenceClassification.from_pretrained(cwd / "out")  # stock transformers
    assert type(reloaded.bert.encoder.layer[0].intermediate.dense) is torch.nn.Linear


def check_targeting(ns, cwd):
    from hf_tdrop import get_targeting, targeted_layers

    model = ns["gpt2_model"]
    assert get_targeting(model) == {"alpha": 0.9, "gamma": 0.5, "mode": "unit"}  # as the page shows
    layers = targeted_layers(model)
    assert list(layers) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert {k: layers["transformer.h.0.mlp.c_fc"][k] for k in ("type", "mode")} == {"type": "Conv1D", "mode": "unit"}


def check_shrinking(ns, cwd):
    model, shrunk = ns["model"], ns["shrunk"]
    assert "intermediate_size: 128 -> 64" in str(ns["report"])
    assert model.config.intermediate_size == shrunk.config.intermediate_size == 64
    ids = torch.randint(0, 100, (2, 9))
    model.eval(), shrunk.eval()
    with torch.no_grad():
        torch.testing.assert_close(shrunk(input_ids=ids).logits, model(input_ids=ids).logits)


def targeted_values(model) -> set:
    from hf_tdrop import targeted_layers

    return {(round(v["alpha"], 6), round(v["gamma"], 6)) for v in targeted_layers(model).values()}


def check_schedule(ns, cwd):
    assert ns["schedule"].at(2000) == pytest.approx({"alpha": 0.495, "gamma": 0.9405})  # the page's comment


def check_trainer_callback(ns, cwd):
    from hf_tdrop import TargetedDropoutConfig

    trainer, model = ns["trainer"], ns["model"]
    assert trainer.state.global_step == 12  # 3 epochs of 32 examples, 8 per step
    end = ns["callback"].resolved_schedule.at(trainer.state.global_step - 1)
    assert targeted_values(model) == {(round(end["alpha"], 6), round(end["gamma"], 6))}
    recorded = TargetedDropoutConfig.from_pretrained(cwd / "out")  # written beside the model at the end
    assert (recorded.alpha, recorded.gamma) == pytest.approx((end["alpha"], end["gamma"]))


def check_accelerate_loop(ns, cwd):
    steps = len(ns["loader"])
    assert ns["tdrop"].last_step == steps
    at = ns["tdrop"].schedule.at(steps)
    assert targeted_values(ns["model"]) == {(round(at["alpha"], 6), round(at["gamma"], 6))}


def check_full_state_dict_saved(ns, cwd):
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(cwd / "out")  # stock, unpatched keys
    trained = ns["accelerator"].unwrap_model(ns["model"]).state_dict()
    torch.testing.assert_close(reloaded.bert.encoder.layer[0].intermediate.dense.weight,
                               trained["bert.encoder.layer.0.intermediate.dense.weight"])


def check_l0_patched(ns, cwd):
    from hf_tdrop import targeted_layers

    layers = targeted_layers(ns["model"])
    assert layers and all(v["method"] == "l0" for v in layers.values())


def check_method_optimizer(ns, cwd):
    trainer = ns["trainer"]
    trainer.create_optimizer()
    groups = trainer.optimizer.param_groups
    gates = {id(m.l0_log_alpha) for m in ns["model"].modules() if hasattr(m, "l0_log_alpha")}
    gate_groups = [g for g in groups if {id(p) for p in g["params"]} & gates]
    assert gate_groups and all(g["lr"] == pytest.approx(1e-3) and g["weight_decay"] == 0 for g in gate_groups)
    assert any(g["lr"] == pytest.approx(0.1) and g["weight_decay"] == pytest.approx(5e-4) for g in groups)


def check_vd_trained_and_finalised(ns, cwd):
    from hf_tdrop import is_patched

    model = ns["model"]
    assert not is_patched(model)
    criteria = {m.tdrop_criterion.name for m in model.modules() if getattr(m, "tdrop_criterion", None) is not None}
    assert criteria == {"log_alpha"}
    recorded = json.loads((cwd / "out" / "tdrop_training_config.json").read_text())  # by RegularizationCallback
    assert recorded["method"] == "variational_dropout" and recorded["kl_warmup_steps"] == 1000


def check_plain_loop_moved_the_gates(ns, cwd):
    from hf_tdrop import L0Config

    init = L0Config(dataset_size=1).init_drop_rate
    start = torch.log(torch.tensor(1 - init)) - torch.log(torch.tensor(init))
    log_alpha = torch.cat([m.l0_log_alpha.detach().flatten() for m in ns["model"].modules() if hasattr(m, "l0_log_alpha")])
    assert (log_alpha - start).abs().max() > 1e-3  # the loss term reached the gates


def check_finalised_and_pruned_by_gates(ns, cwd):
    from transformers import AutoModelForSequenceClassification

    from hf_tdrop import sparsity_report

    assert ns["sweep"].sparsities[-1] == pytest.approx(0.9) and "accuracy" in ns["sweep"].metric_names()
    reloaded = AutoModelForSequenceClassification.from_pretrained(cwd / "l0-pruned")
    layers = {row["name"]: row for row in sparsity_report(reloaded).to_dict()["layers"]}
    assert layers["bert.encoder.layer.0.intermediate.dense"]["weight_sparsity"] == pytest.approx(28 / 32)  # ⌊0.9·32⌋


def check_random_pruning_held(ns, cwd):
    weight = ns["model"].bert.encoder.layer[0].intermediate.dense.weight
    assert ns["trainer"].state.global_step > 0
    assert (weight == 0).float().mean().item() == pytest.approx(28 / 32)  # ⌊0.9·32⌋ per row, held through training


def check_custom_method(ns, cwd):
    from transformers import AutoModelForSequenceClassification

    from hf_tdrop import is_patched

    assert not is_patched(ns["model"]) and ns["trainer"].state.global_step == 4
    assert json.loads((cwd / "out" / "tdrop_training_config.json").read_text())["method"] == "unit_scale"
    reloaded = AutoModelForSequenceClassification.from_pretrained(cwd / "out").eval()
    ids = torch.randint(6, 60, (2, 8))
    ns["model"].eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ns["model"](input_ids=ids).logits)


def check_prune_temporarily(ns, cwd):
    weight = ns["model"].bert.encoder.layer[0].intermediate.dense.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5)  # prune_model, after pruned() restored


def check_which_layers(ns, cwd):
    assert ns["report"].target_source == "patched layers"
    assert ns["report"].describe_targets() == "2 layers, patched layers"


def check_sweeps_written(ns, cwd):
    assert {p.name for p in (cwd / "sweeps").iterdir()} >= {
        "sweep-none.md", "sweep-none.csv", "sweep-none.json", "sweep-none.png",
        "accuracy.csv", "accuracy.json", "accuracy.png"}
    assert ns["table"].to_markdown().count("\n") >= 11  # header, rule and one row per level


def check_evaluate_metrics(ns, cwd):
    assert ns["sweep"].metric_names() == ["accuracy"]
    assert ns["f1"](ns["model"]).keys() == {"f1"}
    assert ns["both"](ns["model"]).keys() == {"accuracy", "f1"}


def check_batchnorm(ns, cwd):
    assert ns["sweep"].recalibration == {"method": "batchnorm", "num_batches": 50}


def check_saved_and_pushed(ns, cwd):
    saved = {p.name for p in (cwd / "bert-ffn50").iterdir()}
    assert {"config.json", "model.safetensors", "tdrop_config.json", "README.md", "sweep.md", "tokenizer_config.json"} <= saved
    (repo_id, files, private), = ns["__uploads__"]
    assert (repo_id, private) == ("me/bert-ffn50", True) and "tdrop_config.json" in files


def check_learned_scores_reloaded(ns, cwd):
    assert (cwd / "l0-run" / "tdrop_criteria.safetensors").is_file()
    dense = ns["reloaded"].bert.encoder.layer[0].intermediate.dense
    assert dense.tdrop_criterion.name == "gates"
    assert ((dense.weight == 0).all(dim=1)).float().mean().item() == pytest.approx(0.5)


def check_cli_outputs(ns, cwd):
    from hf_tdrop import check_nm_sparsity

    assert json.loads((cwd / "gpt2-ffn50" / "config.json").read_text())["n_inner"] == 128  # 4 x 64 -> half
    report = ns["__bash_output__"]  # the shrunk model's sparsity report, as Markdown: nothing zero is left
    assert re.search(r"^\| `transformer\.h\.0\.mlp\.c_fc` +\| Conv1D \| 64×128 +\| +0\.00% \(0/8192\)", report, re.M)
    from transformers import AutoModelForCausalLM

    nm = AutoModelForCausalLM.from_pretrained(cwd / "gpt2-2of4")
    nm_report = check_nm_sparsity(nm, n=2, m=4, target_modules=[r".*\.mlp\..*"])
    assert not nm_report.ok and nm_report.failing_layers == [f"transformer.h.{i}.mlp.c_proj" for i in range(12)]


def check_nm_patched(ns, cwd):
    from hf_tdrop import targeted_layers

    assert {v["mode"] for v in targeted_layers(ns["model"]).values()} == {"nm"}


def check_nm_pruned(ns, cwd):
    from hf_tdrop import check_nm_sparsity

    assert check_nm_sparsity(ns["model"], n=2, m=4).ok


def check_hold(ns, cwd):
    assert ns["hold"].nonzero_held() == 0 and ns["trainer"].state.global_step > 0


PAGE_CHECKS = {
    "index.md": [(None, check_home)],
    "guides/targeting.md": [(None, check_targeting)],
    "guides/shrinking.md": [(None, check_shrinking)],
    "guides/training.md": [("schedule.at(2000)", check_schedule), ("callback.attach(trainer)", check_trainer_callback),
                           ("accelerator.register_for_checkpointing", check_accelerate_loop),
                           ("accelerator.get_state_dict", check_full_state_dict_saved)],
    "guides/methods.md": [("mode=\"unit\"))\n", check_l0_patched), ("method_optimizer(model, args)", check_method_optimizer),
                          ("kl_warmup_steps=1000", check_vd_trained_and_finalised),
                          ("regularization_loss(model, step=update)", check_plain_loop_moved_the_gates),
                          ("\"l0-pruned\"", check_finalised_and_pruned_by_gates),
                          ("hold_pruned(model, report)", check_random_pruning_held),
                          ("class UnitScale", check_custom_method)],
    "guides/pruning.md": [("with pruned(", check_prune_temporarily), ("describe_targets()", check_which_layers),
                          ("combine_sweeps([none, rand]", check_sweeps_written), ("evaluate.combine", check_evaluate_metrics),
                          ("BatchNormRecalibration(train_loader", check_batchnorm)],
    "guides/hub.md": [("push_pruned_to_hub(model", check_saved_and_pushed), ("load_learned_criteria(reloaded", check_learned_scores_reloaded)],
    "guides/cli.md": [("hf-tdrop report", check_cli_outputs)],
    "sparsity.md": [("mode=\"nm\", n=2, m=4))", check_nm_patched), ("check_nm_sparsity(model", check_nm_pruned),
                    ("hold.remove()", check_hold)],
}


def stand_in_hub(monkeypatch) -> list:
    """A Hub that takes uploads without the network, logged in as ``your-name``; returns the list
    of ``(repo_id, file names, private)`` uploaded."""
    from huggingface_hub import HfApi, constants

    uploads, private = [], {}

    def create_repo(self, repo_id, **kwargs):
        private[repo_id] = kwargs.get("private")
        return repo_id

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir()), private.get(repo_id)))

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/0"
        return Info()

    monkeypatch.setattr(HfApi, "whoami", lambda self, *args, **kwargs: {"name": "your-name"})
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    return uploads


LOCAL_METRIC = '''
import datasets
import evaluate
from sklearn.metrics import accuracy_score, f1_score


class Local(evaluate.Metric):
    """A local copy of the Hub's `{name}` metric, for offline tests."""

    def _info(self):
        return evaluate.MetricInfo(description="{name}", citation="", inputs_description="predictions, references",
                                   features=datasets.Features({{"predictions": datasets.Value("int64"),
                                                               "references": datasets.Value("int64")}}))

    def _compute(self, predictions, references, **kwargs):
        return {{"{name}": float({function}(references, predictions, **kwargs))}}
'''


def offline_evaluate_metrics(monkeypatch, directory: Path) -> None:
    """``evaluate.load("accuracy")`` / ``("f1")`` read local copies of the Hub's metrics (the Hub is
    out of reach in the tests); any other name goes to evaluate as usual."""
    evaluate = pytest.importorskip("evaluate")
    from evaluate import loading

    original = loading.load
    paths = {}
    for name, function in (("accuracy", "accuracy_score"), ("f1", "f1_score")):
        path = directory / f"{name}_metric" / f"{name}.py"
        path.parent.mkdir(parents=True)
        path.write_text(LOCAL_METRIC.format(name=name, function=function), encoding="utf-8")
        paths[name] = str(path)

    def load(path, *args, **kwargs):
        return original(paths.get(path, path), *args, **kwargs)

    monkeypatch.setattr(loading, "load", load)
    monkeypatch.setattr(evaluate, "load", load)


def shell_env() -> dict:
    """The environment of a page's shell commands: this interpreter's scripts (``hf-tdrop``) first,
    offline, one thread."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_shell(script: str, cwd: Path) -> str:
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=shell_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{script}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def pages_with_runnable_blocks() -> list[str]:
    return [page for page in GUIDE_PAGES if any(marker_parts(marker or "")[0] in ("run", "output")
                                                for _, marker, _ in code_blocks((DOCS / page).read_text(encoding="utf-8")))]


@pytest.mark.parametrize("page", pages_with_runnable_blocks())
def test_guide_blocks_run(page, tmp_path, monkeypatch):
    """A page's runnable blocks in order, in one namespace, in a scratch directory (python blocks
    executed, shell blocks run by bash, ``output`` blocks run and compared), each ``given`` fixture's
    names put in first; after each block, the checks of what it promises."""
    from hf_tdrop.methods import base

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # methods a page registers go afterwards
    uploads = stand_in_hub(monkeypatch)
    offline_evaluate_metrics(monkeypatch, tmp_path / ".metrics")
    checks = PAGE_CHECKS[page]
    done = []
    torch.manual_seed(0)
    module = types.ModuleType("__docs__")  # a real module, so that a page's dataclasses resolve their fields
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    namespace["__uploads__"] = uploads
    for lang, marker, code in code_blocks((DOCS / page).read_text(encoding="utf-8")):
        verb, given = marker_parts(marker or "")
        if verb not in ("run", "output"):
            continue
        if given:
            namespace.update(FIXTURES[given](tmp_path))
        if verb == "output":
            command, *shown = code.rstrip("\n").split("\n")
            printed = run_shell(command[2:], tmp_path).splitlines()
            lines = iter(printed)
            assert all(any(line == want for line in lines) for want in shown), (shown, printed)
        elif lang == "bash":
            namespace["__bash_output__"] = run_shell(code, tmp_path)
        else:
            exec(compile(code, str(DOCS / page), "exec"), namespace)  # noqa: S102
        for snippet, check in checks:
            if snippet is not None and snippet in code:
                check(namespace, tmp_path)
                done.append(check)
    for snippet, check in checks:
        if snippet is None:
            check(namespace, tmp_path)
            done.append(check)
    assert sorted(c.__name__ for c in done) == sorted(c.__name__ for _, c in checks), "each check runs once"


def guide_blocks(verb: str) -> list:
    return [pytest.param(page, i, code, marker, id=f"{page}:{i}")
            for page in GUIDE_PAGES
            for i, (lang, marker, code) in enumerate(code_blocks((DOCS / page).read_text(encoding="utf-8")))
            if marker and marker_parts(marker)[0].startswith(verb)]


@pytest.mark.parametrize("page, index, code, marker", guide_blocks("run with "))
def test_guide_commands_run_on_tiny_models(page, index, code, marker, tmp_path):
    """A guide's shell block (e.g. a benchmark of a BERT-base-sized model), run as written by bash
    in a scratch directory beside the repository's ``examples/`` and ``benchmarks/``, every
    ``python`` in it given the marker's flags after its own (the later flag wins): a tiny model, the
    project's data (``$HF_TDROP_SHARED_DATA``) instead of the user's. Each command prints its table."""
    tiny = marker[len("run with "):]
    if "HF_TDROP_SHARED_DATA" in tiny and not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    for folder in ("examples", "benchmarks"):
        (tmp_path / folder).symlink_to(REPO_ROOT / folder)
    wrapper = tmp_path / "bin" / "python"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/bash\nexec {shlex.quote(sys.executable)} "$@" {tiny}\n', encoding="utf-8")
    nice = wrapper.parent / "nice"  # a block's `nice -n 19 python ...` runs at the test's own priority
    nice.write_text('#!/bin/bash\n[ "$1" = -n ] && shift 2\nexec "$@"\n', encoding="utf-8")
    for script in (wrapper, nice):
        script.chmod(0o755)
    env = shell_env()
    env.update(PATH=f"{wrapper.parent}{os.pathsep}{env['PATH']}", HF_TDROP_SHARED_DATA=str(SHARED_DATA))
    proc = subprocess.run(["bash", "-e", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    commands = len(re.findall(r"^\s*(?:\S+=\S+\s+)*(?:nice -n \d+ )?python ", code, re.M))
    tables = len(re.findall(r"(?:^[^|\n]*\n)\|.*\|$", "\n" + proc.stdout, re.M))
    assert commands and tables >= commands, proc.stdout[-3000:]  # a result table per command


DISTRIBUTED = """
import json, os, sys
from pathlib import Path
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from docs_fixtures import FIXTURES
dist.init_process_group("gloo")
namespace = {{"__name__": "__docs__", **FIXTURES[{given!r}](Path.cwd())}}
before = {{k: v.detach().clone() for k, v in namespace["model"].state_dict().items()}}
exec(compile({code!r}, {page!r}, "exec"), namespace)
from hf_tdrop import targeted_layers
model = namespace["model"]
state = {{k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach() for k, v in model.state_dict().items()}}
changed = sum(not torch.equal(state[k], before[k]) for k in before if k in state)
digest = float(sum(v.double().sum() for v in state.values()))
layers = targeted_layers(model)
record = dict(rank=dist.get_rank(), changed=changed, digest=digest, steps=namespace["tdrop"].last_step,
              batches=len(namespace["loader"]), targets=sorted({{(v["alpha"], v["gamma"]) for v in layers.values()}}))
Path(f"rank{{dist.get_rank()}}.json").write_text(json.dumps(record))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("page, index, code, marker", guide_blocks("run distributed"))
def test_guide_distributed_blocks_train_on_two_processes(page, index, code, marker, tmp_path):
    """A block for sharded training, run as written on 2 CPU processes (gloo) by torchrun, its
    fixture built alike on both: both ranks train, step the schedule once per batch and end with
    the same full weights."""
    script = tmp_path / "block.py"
    script.write_text(DISTRIBUTED.format(tests=str(REPO_ROOT / "tests"), given=marker_parts(marker)[1], code=code,
                                         page=str(DOCS / page)), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=tmp_path, env={**shell_env(), "PYTHONPATH": str(REPO_ROOT / "tests")},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["targets"] == ranks[1]["targets"]
    for record in ranks:
        assert record["changed"] > 0 and record["steps"] == record["batches"] > 0, record
        assert len(record["targets"]) == 1, record  # every layer at the schedule's value


@pytest.mark.parametrize("page, index, code, marker", guide_blocks("run on cuda"))
def test_guide_cuda_blocks(page, index, code, marker, tmp_path, monkeypatch):
    """Blocks that need a GPU run on one when there is one (never in CPU-only CI)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__", **FIXTURES[marker_parts(marker)[1]](tmp_path)}
    exec(compile(code, str(DOCS / page), "exec"), namespace)  # noqa: S102


def code_lines(text: str) -> list[str]:
    """A text's non-blank lines without indentation or trailing ``  # comments``."""
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.strip()]


def is_excerpt(excerpt: str, source: str) -> bool:
    """Whether the excerpt's lines are the source's, in order: consecutive within each stretch, a
    ``...`` line standing for any number of lines left out."""
    lines, at = code_lines(source), 0
    stretch: list[str] = []
    for line in [*code_lines(excerpt), "..."]:
        if line != "...":
            stretch.append(line)
            continue
        found = next((i for i in range(at, len(lines) - len(stretch) + 1) if lines[i:i + len(stretch)] == stretch), None)
        if found is None:
            return False
        at, stretch = found + len(stretch), []
    return True


def test_the_excerpt_check_needs_the_lines_in_order():
    source = "def f(x):\n    a = 1  # one\n    b = 2\n    c = 3\n    return a\n"
    assert is_excerpt("a = 1\nb = 2", source) and is_excerpt("a = 1\n...\nreturn a", source)
    assert not is_excerpt("a = 1\nc = 3", source) and not is_excerpt("b = 2\n...\na = 1", source)
    assert not is_excerpt("a = 2", source)


@pytest.mark.parametrize("page, index, code, marker", guide_blocks("excerpt of "))
def test_guide_excerpts_are_the_scripts_code(page, index, code, marker):
    """An excerpt is the script's own code, line for line (indentation and comments aside, ``...``
    for lines left out); the script itself is run by its tests."""
    script = (REPO_ROOT / marker[len("excerpt of "):]).read_text(encoding="utf-8")
    assert is_excerpt(code, script), f"{page}: the excerpt is not in {marker}:\n{code}"


@pytest.mark.parametrize("page, index, code, marker", guide_blocks("accelerate config"))
def test_guide_accelerate_configs_load(page, index, code, marker, tmp_path):
    """A config file for ``accelerate launch --config_file``: accelerate reads it, with FSDP version 2."""
    from accelerate.commands.config.config_args import ClusterConfig

    path = tmp_path / "config.yaml"
    path.write_text(code, encoding="utf-8")
    config = ClusterConfig.from_yaml_file(str(path))
    assert str(config.distributed_type).endswith("FSDP") and int(config.fsdp_config["fsdp_version"]) == 2


# --------------------------------------------------------------------------------------------------
# the translation page: every command's flags parse
# --------------------------------------------------------------------------------------------------

RECORD_COMMANDS = r"""
python() { if [ "$1" = examples/wmt_en_de.py ]; then shift; printf '%s\0' "$@"; printf '\n\0'; fi; }
accelerate() { while [ $# -gt 0 ] && [ "${1%.py}" = "$1" ]; do shift; done; python "$@"; }
"""


def wmt_commands(script: str) -> list[list[str]]:
    """The arguments of every ``python examples/wmt_en_de.py`` (or ``accelerate launch ...``) command
    of a shell script, as bash expands them (variables, braces, quotes, continued lines)."""
    proc = subprocess.run(["bash", "-c", RECORD_COMMANDS + script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands, current = [], []
    for word in proc.stdout.split("\0")[:-1]:
        if word == "\n":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return commands


def test_translation_commands_parse(tmp_path, monkeypatch, capsys):
    """Every wmt_en_de.py command of the translation page and of the script's --help, with its shell
    variables as the page sets them, is accepted by the script's flag checks."""
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    import wmt_en_de

    page = (DOCS / "reproductions" / "translation.md").read_text(encoding="utf-8")
    scripts = [code for lang, _, code in code_blocks(page) if lang == "bash"]
    scripts.append("D=path/to/multi30k\n" + wmt_en_de.EXAMPLES.split("\n", 1)[1])
    commands = [args for script in scripts for args in wmt_commands(script)]
    assert len(commands) >= 15, commands
    monkeypatch.chdir(tmp_path)
    for args in commands:
        assert not any(a.startswith(("data/", "$")) or "/multi30k/multi30k" in a for a in args), args
        if "--combine_runs" in args:  # runs that the page's earlier commands write
            for run_dir in args[args.index("--combine_runs") + 1:args.index("--output_dir")]:
                (tmp_path / run_dir / "sweeps").mkdir(parents=True, exist_ok=True)
                (tmp_path / run_dir / "sweeps" / "sweep-test-weight.json").write_text("{}")
        try:
            wmt_en_de.parse_args(args)
        except SystemExit:
            pytest.fail(f"wmt_en_de.py {' '.join(args)}\n{capsys.readouterr().err}")
    data_flags = [a for args in commands for a in args if a.endswith(".gz")]
    assert data_flags and all(a.startswith(("path/to/multi30k/", "path/to/wmt14/")) for a in data_flags), data_flags


# --------------------------------------------------------------------------------------------------
# API pages
# --------------------------------------------------------------------------------------------------


def test_sparsity_report_to_dict_keys_are_documented():
    from conftest import tiny_bert

    from hf_tdrop import SparsityReport, sparsity_report

    report = sparsity_report(tiny_bert()).to_dict()
    keys = set(report) | set(report["layers"][0]) | set(report["total"]) | set(report["total_excluding_heads"])
    page = (DOCS / "api" / "reports.md").read_text(encoding="utf-8")
    docstring = SparsityReport.to_dict.__doc__
    assert not [k for k in keys if f"``{k}``" not in docstring and f'"{k}"' not in docstring]
    assert not [k for k in keys if f"`{k}`" not in page and f'"{k}"' not in page]


# --------------------------------------------------------------------------------------------------
# links, words, the site
# --------------------------------------------------------------------------------------------------


def relative_links(text: str) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]


def test_readme_links_resolve():
    links = relative_links(README.read_text(encoding="utf-8"))
    assert "results/image_classification/digits/weight_pruning.png" in links
    assert "docs/sparsity.md" in links
    missing = [link for link in links if not (REPO_ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_docs_links_stay_inside_the_site():
    """mkdocs --strict refuses links outside docs/: result files are named as code text, not linked."""
    assert doc_pages(), "docs/ has no page"
    for page in doc_pages():
        for link in relative_links(page.read_text(encoding="utf-8")):
            target = (page.parent / link).resolve()
            assert DOCS.resolve() in target.parents, f"{page.relative_to(REPO_ROOT)} links outside docs/: {link}"


@pytest.mark.parametrize("pattern", [r"/work/", r"/tmp/", r"\bissue[- ]#?\d", r"\bthis session\b", r"\.\./shared"])
def test_user_facing_text_has_no_internal_references(pattern):
    files = [README, *doc_pages(), REPO_ROOT / "examples" / "wmt_en_de.py",
             REPO_ROOT / "examples" / "translation_data.py"]
    offenders = [str(f.relative_to(REPO_ROOT)) for f in files
                 if f.exists() and re.search(pattern, f.read_text(encoding="utf-8"), re.I)]
    assert not offenders, f"{pattern!r} found in {offenders}"


def test_docs_nav_lists_every_page():
    yaml = (REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in doc_pages():
        assert str(page.relative_to(DOCS)) in yaml, f"{page.relative_to(REPO_ROOT)} is not in mkdocs.yml's nav"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="the docs extra is not installed (pip install -e '.[docs]')")
def test_site_builds_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
