"""The README and the documentation pages: runnable examples run, links resolve, CI runs the README's
test command verbatim, and the text speaks to users (no machine paths, no internal issue numbers)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
RUN_MARKER = "<!-- test: run -->"


def python_blocks(text: str, marked_only: bool = True) -> list[str]:
    """The ```python blocks of a Markdown text; with ``marked_only``, those right after RUN_MARKER."""
    blocks = []
    for match in re.finditer(r"(?P<marker><!-- test: run -->\n)?```python\n(?P<code>.*?)```", text, re.S):
        if match.group("marker") or not marked_only:
            blocks.append(match.group("code"))
    return blocks


def doc_pages() -> list:
    return sorted(DOCS.rglob("*.md"))


def test_readme_examples_run(tmp_path, monkeypatch):
    """Every README block marked runnable, in one namespace, in a scratch directory; the Hub push goes to
    a stand-in HfApi (no network), which receives the saved folder."""
    from huggingface_hub import HfApi

    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return repo_id

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/0"
        return Info()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
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


def test_readme_python_blocks_compile():
    """Blocks not marked runnable (none today) must at least be valid Python."""
    for code in python_blocks(README.read_text(encoding="utf-8"), marked_only=False):
        compile(code, str(README), "exec")


def test_ci_runs_the_readme_test_command_verbatim():
    readme = README.read_text(encoding="utf-8")
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    main_job = 'pip install torch==2.13.0 && pip install -e ".[examples]" && python examples/image_classification.py'
    assert test_command in commands and main_job in commands
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert f'{test_command} 2>&1 | tee "$log"' in ci
    assert "mkdocs build --strict" in ci


def relative_links(text: str) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]


def test_readme_links_resolve():
    links = relative_links(README.read_text(encoding="utf-8"))
    assert "results/image_classification/digits/weight_pruning.png" in links
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if not (REPO_ROOT / link).exists()
               and link != "docs/sparsity.md"]  # written alongside, by its own change
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
@pytest.mark.skipif(not (DOCS / "sparsity.md").exists(), reason="docs/sparsity.md is not there yet")
def test_site_builds_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
