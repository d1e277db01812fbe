"""Shared fixtures: tiny randomly initialised HF models built from configs (nothing downloaded)
and the path of the shared offline data (``../shared/data`` beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HF_TDROP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_benchmark(name: str, argv: list[str], capsys):
    """Run ``benchmarks/<name>.py``'s ``main(argv)`` in this process (torch's thread count restored
    after it): returns the module and what it printed."""
    import importlib
    import sys

    path = str(REPO_ROOT / "benchmarks")
    if path not in sys.path:
        sys.path.insert(0, path)
    module = importlib.import_module(name)
    previous_threads = torch.get_num_threads()
    try:
        module.main(argv)
    finally:
        torch.set_num_threads(previous_threads)
    return module, capsys.readouterr().out


def run_script_in_fresh_python(script: Path, argv: list, cwd, heavy_modules) -> tuple[int, str, str, list]:
    """Run ``script`` as ``__main__`` in a fresh interpreter with ``argv``, as ``python script``
    does (its folder first on ``sys.path``); returns (exit status, stdout, stderr, which of
    ``heavy_modules`` had been imported by then)."""
    import json
    import subprocess
    import sys

    probe = (
        "import json, runpy, sys\n"
        f"sys.argv = [{str(script)!r}] + {list(argv)!r}\n"
        f"sys.path.insert(0, {str(Path(script).parent)!r})\n"
        "code = 0\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({list(heavy_modules)!r}))\n"
        "sys.stderr.write('HEAVY=' + json.dumps(heavy) + '\\n')\n"
        "sys.exit(code)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    *err_lines, heavy_line = proc.stderr.rstrip("\n").split("\n")
    assert heavy_line.startswith("HEAVY="), proc.stderr[-3000:]
    return proc.returncode, proc.stdout, "\n".join(err_lines), json.loads(heavy_line[len("HEAVY="):])


def require_shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (expected ../shared/data beside the repo)")
    return path


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=64, num_labels=3))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2))


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0))


def tiny_marian():
    from transformers import MarianConfig, MarianMTModel

    return MarianMTModel(MarianConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        pad_token_id=1, eos_token_id=2, decoder_start_token_id=1))


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64))


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=48, num_labels=4))


def tiny_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
        num_labels=4))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64))


def tiny_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=70, num_labels=3))


TINY_MODELS = {
    "bert": tiny_bert, "roberta": tiny_roberta, "gpt2": tiny_gpt2, "t5": tiny_t5,
    "marian": tiny_marian, "bart": tiny_bart, "vit": tiny_vit, "resnet": tiny_resnet, "llama": tiny_llama,
}


def tiny_inputs(name: str, batch: int = 2, seq: int = 7) -> dict:
    """Deterministic inputs for :data:`TINY_MODELS` ``name``, with labels so ``.loss`` exists."""
    g = torch.Generator().manual_seed(0)
    if name in ("vit", "resnet"):
        size = 16
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g),
                "labels": torch.randint(0, 4, (batch,), generator=g)}
    ids = torch.randint(3, 99, (batch, seq), generator=g)
    if name in ("bert", "roberta"):
        return {"input_ids": ids, "labels": torch.randint(0, 3, (batch,), generator=g)}
    if name in ("gpt2", "llama"):
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(3, 99, (batch, seq - 2), generator=g)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
