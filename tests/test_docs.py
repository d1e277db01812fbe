"""The README and the documentation pages: runnable examples run (the README's as a user runs it,
offline and without a Hub token), the guides' code blocks run, the translation commands parse, links
resolve, CI runs the README's commands, and the text speaks to users (no machine paths, no internal
issue numbers)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
RUN_MARKER = "<!-- test: run -->"
CPU_INDEX_ADVICE = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
INSTALL_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[examples]"'
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
MAIN_JOB = 'pip install torch==2.13.0 && pip install -e ".[examples]" && python examples/image_classification.py'
GUIDE_PAGES = ("index.md", "guides/targeting.md", "guides/shrinking.md")
"""Pages whose every code block is marked and checked: ``<!-- test: run -->`` (run as written),
``<!-- test: run with ARGS -->`` (a command, run with ARGS appended: a tiny model instead of a big
one) or ``<!-- test: install -->`` (one of the README's install commands)."""


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
    from huggingface_hub import HfApi, constants

    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return repo_id

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/0"
        return Info()

    monkeypatch.setattr(HfApi, "whoami", lambda self, *args, **kwargs: {"name": "your-name"})
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
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
# the guides: every code block runs (on tiny models)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", GUIDE_PAGES)
def test_every_code_block_of_the_guides_is_checked(page):
    blocks = code_blocks((DOCS / page).read_text(encoding="utf-8"))
    assert blocks, page
    for lang, marker, code in blocks:
        assert marker is not None, f"{page}: a ```{lang} block has no <!-- test: ... --> marker:\n{code}"
        assert marker in ("run", "install") or marker.startswith("run with "), f"{page}: marker {marker!r}"
        if marker == "install":
            assert lang == "bash" and code.strip() in (INSTALL_COMMAND, CPU_INDEX_ADVICE), code
        if marker.startswith("run with "):
            assert lang == "bash", f"{page}: 'run with' is for commands"


def check_home(namespace, cwd):
    from transformers import AutoModelForSequenceClassification

    from hf_tdrop import is_patched

    assert not is_patched(namespace["model"])
    reloaded = AutoModelForSequenceClassification.from_pretrained(cwd / "out")  # stock transformers
    assert type(reloaded.bert.encoder.layer[0].intermediate.dense) is torch.nn.Linear


def check_targeting(namespace, cwd):
    from hf_tdrop import get_targeting, targeted_layers

    model = namespace["gpt2_model"]
    assert get_targeting(model) == {"alpha": 0.9, "gamma": 0.5, "mode": "unit"}  # as the page shows
    layers = targeted_layers(model)
    assert list(layers) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert {k: layers["transformer.h.0.mlp.c_fc"][k] for k in ("type", "mode")} == {"type": "Conv1D", "mode": "unit"}


def check_shrinking(namespace, cwd):
    model, shrunk = namespace["model"], namespace["shrunk"]
    assert "intermediate_size: 128 -> 64" in str(namespace["report"])
    assert model.config.intermediate_size == shrunk.config.intermediate_size == 64
    ids = torch.randint(0, 100, (2, 9))
    model.eval(), shrunk.eval()
    with torch.no_grad():
        torch.testing.assert_close(shrunk(input_ids=ids).logits, model(input_ids=ids).logits)


PAGE_CHECKS = {"index.md": check_home, "guides/targeting.md": check_targeting, "guides/shrinking.md": check_shrinking}


@pytest.mark.parametrize("page", GUIDE_PAGES)
def test_guide_python_blocks_run(page, tmp_path, monkeypatch):
    """A page's python blocks, in one namespace, in a scratch directory; then what they promise."""
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks((DOCS / page).read_text(encoding="utf-8"))
    assert blocks, page
    torch.manual_seed(0)
    namespace = {"__name__": "__docs__"}
    for code in blocks:
        exec(compile(code, str(DOCS / page), "exec"), namespace)  # noqa: S102
    PAGE_CHECKS[page](namespace, tmp_path)


def marked_commands() -> list:
    return [pytest.param(code.strip(), marker[len("run with "):], id=f"{page}:{i}")
            for page in GUIDE_PAGES
            for i, (lang, marker, code) in enumerate(code_blocks((DOCS / page).read_text(encoding="utf-8")))
            if marker and marker.startswith("run with ")]


@pytest.mark.parametrize("command, tiny", marked_commands())
def test_guide_commands_run_on_tiny_models(command, tiny):
    """A command of a guide (e.g. a benchmark of a BERT-base-sized model), run as written with the
    marker's flags appended, which make the model tiny."""
    words = shlex.split(command.replace("\\\n", " "))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words[0] == "python", command
    proc = subprocess.run([sys.executable, *words[1:], *shlex.split(tiny)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"^\|.*\|$", proc.stdout, re.M), proc.stdout[-2000:]  # its result table


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
