"""save_pruned / push_pruned_to_hub: loadable checkpoint, tdrop_config.json, model card; fake Hub upload."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_bert, tiny_inputs

from hf_tdrop import patch_model, prune_model, prune_sweep, sparsity_report, unpatch_model
from hf_tdrop.hub import push_pruned_to_hub, save_pruned
from hf_tdrop.shrink import shrink_model

SENTINEL = "hf_SENTINELtoken0123456789abcdefXYZ"


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": i + 4 for i in range(95)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def accuracy_fn(inputs):
    def evaluate(model):
        model.eval()
        with torch.no_grad():
            out = model(**inputs)
        return {"accuracy": (out.logits.argmax(-1) == inputs["labels"]).float().mean().item(), "loss": out.loss.item()}

    return evaluate


@pytest.fixture
def pruned_bert():
    """A tiny BERT trained-with-TD stand-in: patched (config recorded), unpatched, swept, unit-pruned, shrunk."""
    model = tiny_bert().eval()
    model.config.architectures = ["BertForSequenceClassification"]
    patch_model(model, alpha=0.66, gamma=0.75, mode="unit")
    training_config = model.tdrop_config
    training_config.extra["schedule"] = {"kind": "linear", "ramp_steps": 100}
    unpatch_model(model)
    inputs = tiny_inputs("bert", batch=6)
    sweep = prune_sweep(model, accuracy_fn(inputs), [0.0, 0.25, 0.5], mode="unit", progress=False,
                        run_name="targeted")
    prune_report = prune_model(model, 0.5, mode="unit")
    shrink_report = shrink_model(model)
    return model, dict(training_config=training_config, sweep=sweep, prune_report=prune_report,
                       shrink_report=shrink_report), inputs


def test_save_pruned_writes_checkpoint_config_card_and_sweep(pruned_bert, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, kwargs, inputs = pruned_bert
    out = save_pruned(model, tmp_path / "out", tokenizer_or_processor=tiny_tokenizer(),
                      base_model="google-bert/bert-base-uncased", **kwargs)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tdrop_config.json", "README.md", "tokenizer.json",
            "sweep.md", "sweep.csv", "sweep.json", "sweep.png"} <= names

    # stock transformers loads the shrunk checkpoint and computes the same logits
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.intermediate_size == 24
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("w5") == 9

    meta = json.loads((out / "tdrop_config.json").read_text())
    assert meta["pruning"]["mode"] == "unit" and meta["pruning"]["sparsity"] == 0.5
    assert meta["pruning"]["layers"] == [layer.name for layer in kwargs["prune_report"].layers]
    assert "bert.encoder.layer.1.intermediate.dense" in meta["pruning"]["layers"]
    assert (meta["targeted_dropout"]["alpha"], meta["targeted_dropout"]["gamma"]) == (0.66, 0.75)
    assert meta["schedule"] == {"kind": "linear", "ramp_steps": 100}
    assert meta["sparsity"]["total"] == sparsity_report(model).total
    assert meta["shrink"]["config_changes"] == {"intermediate_size": [48, 24]}
    assert meta["shrink"]["params_after"] == sum(p.numel() for p in model.parameters())
    assert meta["base_model"] == "google-bert/bert-base-uncased"

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["hf-tdrop", "targeted-dropout", "pruned"]
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert kwargs["sweep"].to_markdown() in card.text
    assert (out / "sweep.md").read_text() == kwargs["sweep"].to_markdown()
    assert "![pruning sweep](sweep.png)" in card.text
    assert "| targeted dropout γ (gamma) | 0.75 |" in card.text
    assert kwargs["shrink_report"].to_markdown() in card.text
    assert "AutoModelForSequenceClassification.from_pretrained" in card.text


def test_save_pruned_several_sweeps_side_by_side(tmp_path):
    from hf_tdrop import combine_sweeps

    model = tiny_bert().eval()
    inputs = tiny_inputs("bert", batch=6)
    runs = [prune_sweep(model, accuracy_fn(inputs), [0.0, 0.5], run_name=name, progress=False)
            for name in ("none", "targeted")]
    out = save_pruned(model, tmp_path / "o", sweep=runs, sparsity=0.5, mode="weight")
    card = (out / "README.md").read_text()
    for metric in ("accuracy", "loss"):
        assert combine_sweeps(runs, metric).to_markdown() in card
    assert [r["run_name"] for r in json.loads((out / "sweep.json").read_text())] == ["none", "targeted"]
    assert (out / "sweep.png").stat().st_size > 0
    meta = json.loads((out / "tdrop_config.json").read_text())
    assert meta["pruning"] == {"sparsity": 0.5, "mode": "weight"} and meta["shrink"] is None


def test_patched_model_records_its_config_and_layers(tmp_path):
    model = tiny_bert()
    patch_model(model, alpha=0.5, gamma=0.25, target_modules="intermediate.dense")
    out = save_pruned(model, tmp_path / "o")
    meta = json.loads((out / "tdrop_config.json").read_text())
    assert meta["targeted_dropout"]["gamma"] == 0.25
    assert meta["patched_layers"] == ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"]
    assert "tdrop_state" not in (out / "config.json").read_text()


def test_refuses_non_empty_dir_and_bad_arguments_without_writing(tmp_path):
    model = tiny_bert()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        save_pruned(model, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    save_pruned(model, busy, overwrite=True)
    assert {"keep.txt", "model.safetensors", "README.md"} <= {p.name for p in busy.iterdir()}

    fresh = tmp_path / "fresh"
    bad = [
        (dict(sparsity=1.5), "sparsity"),
        (dict(mode="block"), "mode"),
        (dict(method="l1"), "method"),
        (dict(sweep="table"), "sweep"),
        (dict(schedule={1, 2}), "schedule"),
        (dict(schedule={"f": object()}), "schedule"),
        (dict(training_config=3), "training_config"),
        (dict(tokenizer_or_processor=object()), "tokenizer_or_processor"),
        (dict(base_model=""), "base_model"),
        (dict(overwrite="yes"), "overwrite"),
        (dict(prune_report=prune_model(tiny_bert(), 0.5), mode="unit"), "disagrees"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            save_pruned(model, fresh, **kwargs)
        assert not fresh.exists()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Replace HfApi.create_repo / upload_folder: record calls, copy the folder; no network."""
    from huggingface_hub import HfApi

    calls = {"create_repo": [], "upload_folder": [], "tokens": []}
    uploaded = tmp_path / "uploaded"

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append((repo_id, kwargs))
        calls["tokens"].append(self.token)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"].append((repo_id, kwargs))
        shutil.copytree(folder_path, uploaded)
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    return calls, uploaded


def _assert_no_token(folder, token):
    for path in folder.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path.name


def test_push_uploads_the_saved_folder_without_token(pruned_bert, fake_hub, capsys, caplog):
    calls, uploaded = fake_hub
    model, kwargs, _ = pruned_bert
    info = push_pruned_to_hub(model, "someone/tiny-bert-unit50", private=True, **kwargs)
    assert info.commit_url.endswith("/commit/abc")
    assert calls["create_repo"] == [("someone/tiny-bert-unit50", {"private": True, "repo_type": "model", "exist_ok": True})]
    (repo, upload_kwargs), = calls["upload_folder"]
    assert repo == "someone/tiny-bert-unit50" and upload_kwargs["repo_type"] == "model"
    assert calls["tokens"] == [None]  # huggingface_hub resolves HF_TOKEN itself

    names = {p.name for p in uploaded.iterdir()}
    assert {"model.safetensors", "config.json", "tdrop_config.json", "README.md", "sweep.md", "sweep.png"} <= names
    card = (uploaded / "README.md").read_text()
    assert kwargs["sweep"].to_markdown() in card
    assert "# tiny-bert-unit50" in card and 'from_pretrained("someone/tiny-bert-unit50")' in card
    _assert_no_token(uploaded, SENTINEL)
    captured = capsys.readouterr()
    assert SENTINEL not in captured.out + captured.err + caplog.text


def test_training_config_reads_back_from_the_saved_record(tmp_path):
    from hf_tdrop import TargetedDropoutConfig

    config = TargetedDropoutConfig(alpha=0.5, gamma=0.25, mode="unit")
    with_config = save_pruned(tiny_bert(), tmp_path / "with", training_config=config)
    assert TargetedDropoutConfig.from_pretrained(with_config) == config
    assert TargetedDropoutConfig.from_pretrained(with_config / "tdrop_config.json") == config
    without = save_pruned(tiny_bert(), tmp_path / "without")
    with pytest.raises(FileNotFoundError, match="records no training config"):
        TargetedDropoutConfig.from_pretrained(without)
    with pytest.raises(ValueError, match="records no training config"):
        TargetedDropoutConfig.from_pretrained(without / "tdrop_config.json")


def test_save_pruned_takes_public_arguments_only(tmp_path):
    import inspect

    assert not [name for name in inspect.signature(save_pruned).parameters if name.startswith("_")]
    out = save_pruned(tiny_bert(), tmp_path / "local")
    card = (out / "README.md").read_text()
    assert "# Pruned model" in card and 'from_pretrained("path/to/this/model")' in card


def test_push_with_explicit_token_and_bad_arguments(fake_hub, tmp_path):
    calls, uploaded = fake_hub
    model = tiny_bert()
    explicit = "hf_EXPLICITsentinel9876543210"
    push_pruned_to_hub(model, "someone/x", token=explicit)
    assert calls["tokens"] == [explicit] and calls["create_repo"][0][1]["private"] is False
    _assert_no_token(uploaded, explicit)
    _assert_no_token(uploaded, SENTINEL)
    for repo_id, kwargs, message in [
        ("a/b/c", {}, "Repo id"),
        ("", {}, "repo_id"),
        ("someone/x", {"private": "yes"}, "private"),
        ("someone/x", {"output_dir": tmp_path}, "output_dir"),
        ("someone/x", {"sparsity": -0.1}, "sparsity"),
    ]:
        with pytest.raises(ValueError, match=message):
            push_pruned_to_hub(model, repo_id, **kwargs)
    assert len(calls["create_repo"]) == 1 and len(calls["upload_folder"]) == 1


def test_save_pruned_records_which_targets_were_pruned_and_why(tmp_path):
    """A GPT-2-like model trained on its MLPs only: the record names the pruned layers and their
    source next to the training targets, and they agree."""
    from conftest import tiny_gpt2
    from huggingface_hub import ModelCard

    model = patch_model(tiny_gpt2(), alpha=0.5, gamma=0.5, mode="unit", target_modules=r".*\.mlp\..*")
    report = prune_model(model, 0.5, mode="unit")
    out = save_pruned(model, tmp_path / "o", prune_report=report)
    meta = json.loads((out / "tdrop_config.json").read_text())
    assert meta["targeted_dropout"]["target_modules"] == r".*\.mlp\..*"
    assert meta["pruning"]["target_source"] == "patched layers"
    assert meta["pruning"]["layers"] == meta["patched_layers"] == list(_patched_names(model))
    assert not any("attn" in name for name in meta["pruning"]["layers"])
    card = ModelCard.load(out / "README.md").text
    assert "| pruned layers | 4 (patched layers) |" in card and r"| trained targets | `.*\.mlp\..*` |" in card


def _patched_names(model):
    from hf_tdrop import targeted_layers

    return targeted_layers(model).keys()


def test_save_pruned_records_the_alpha_gamma_the_layers_were_trained_at(tmp_path):
    """The config a model was patched with is not what a schedule trained: the record follows the layers."""
    from hf_tdrop import set_targeting

    model = patch_model(tiny_bert(), alpha=0.3, gamma=0.3)
    set_targeting(model, alpha=0.9, gamma=0.8)  # e.g. where a schedule left them
    out = save_pruned(model, tmp_path / "o")
    meta = json.loads((out / "tdrop_config.json").read_text())
    assert (meta["targeted_dropout"]["alpha"], meta["targeted_dropout"]["gamma"]) == (0.9, 0.8)
    assert "| targeted dropout α (alpha) | 0.9 |" in (out / "README.md").read_text()


def _l0_bert(mode="unit"):
    from hf_tdrop import L0Config, finalize_model

    torch.manual_seed(0)
    model = patch_model(tiny_bert(), config=L0Config(dataset_size=10, mode=mode, target_modules="intermediate.dense"))
    for name, p in model.named_parameters():
        if name.endswith("l0_log_alpha"):
            with torch.no_grad():
                p.copy_(torch.randn_like(p))  # distinct learned scores
    finalize_model(model)
    return model


def test_learned_criteria_round_trip_through_the_sidecar(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from hf_tdrop import load_learned_criteria, save_learned_criteria

    model = _l0_bert()
    model.save_pretrained(tmp_path / "ckpt")
    path = save_learned_criteria(model, tmp_path / "ckpt")
    assert path.name == "tdrop_criteria.safetensors"
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    loaded = load_learned_criteria(reloaded, tmp_path / "ckpt")
    assert sorted(loaded) == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    for name, criterion in loaded.items():
        original = model.get_submodule(name).tdrop_criterion
        assert (criterion.name, criterion.granularity) == ("gates", "unit")
        assert torch.equal(criterion.scores, original.scores)
    a, b = prune_model(model, 0.5, mode="unit", method="gates"), prune_model(reloaded, 0.5, mode="unit", method="gates")
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert a.target_source == b.target_source == "layers with learned scores"
    # nothing learned: nothing written; no sidecar: a clear error, or {} with missing_ok
    assert save_learned_criteria(tiny_bert(), tmp_path / "plain") is None and not (tmp_path / "plain").exists()
    with pytest.raises(FileNotFoundError, match="No tdrop_criteria.safetensors"):
        load_learned_criteria(reloaded, tmp_path / "plain")
    assert load_learned_criteria(reloaded, tmp_path / "plain", missing_ok=True) == {}


def test_load_learned_criteria_reads_the_older_torch_file_and_checks_shapes(tmp_path):
    from hf_tdrop import load_learned_criteria

    model = _l0_bert(mode="weight")
    layer = "bert.encoder.layer.0.intermediate.dense"
    c = model.get_submodule(layer).tdrop_criterion
    (tmp_path / "old").mkdir()
    torch.save({layer: {"name": c.name, "granularity": c.granularity, "scores": c.scores}},
               tmp_path / "old" / "learned_criterion.pt")
    fresh = tiny_bert()
    loaded = load_learned_criteria(fresh, tmp_path / "old")
    assert list(loaded) == [layer] and torch.equal(fresh.get_submodule(layer).tdrop_criterion.scores, c.scores)

    (tmp_path / "bad").mkdir()
    torch.save({layer: {"name": "gates", "granularity": "unit", "scores": torch.zeros(3)}},
               tmp_path / "bad" / "learned_criterion.pt")
    before = tiny_bert()
    with pytest.raises(ValueError, match=r"scores of shape \(3,\), the layer needs \(48,\)"):
        load_learned_criteria(before, tmp_path / "bad")
    assert not hasattr(before.get_submodule(layer), "tdrop_criterion")
    torch.save({"no.such.layer": {"name": "gates", "granularity": "unit", "scores": torch.zeros(3)}},
               tmp_path / "bad" / "learned_criterion.pt")
    with pytest.raises(ValueError, match="no such supported layer"):
        load_learned_criteria(before, tmp_path / "bad")


def test_save_pruned_writes_the_learned_scores_beside_the_weights(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from hf_tdrop import load_learned_criteria

    model = _l0_bert()
    out = save_pruned(model, tmp_path / "o")
    meta = json.loads((out / "tdrop_config.json").read_text())
    assert meta["learned_criteria"] == {"file": "tdrop_criteria.safetensors", "criteria": ["gates"],
                                        "layers": [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]}
    assert "| learned pruning scores | gates (2 layers" in (out / "README.md").read_text()
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert len(load_learned_criteria(reloaded, out)) == 2
    # scores that no longer fit their layer are left out (with a warning), not written wrong
    from hf_tdrop import LearnedCriterion, save_learned_criteria

    layer = model.get_submodule("bert.encoder.layer.1.intermediate.dense")
    layer.tdrop_criterion = LearnedCriterion("gates", "unit", torch.zeros(3))
    out = save_pruned(model, tmp_path / "stale")
    assert json.loads((out / "tdrop_config.json").read_text())["learned_criteria"]["layers"] == [
        "bert.encoder.layer.0.intermediate.dense"]
    with pytest.raises(ValueError, match=r"shape \(3,\), the layer needs \(48,\)"):
        save_learned_criteria(model, tmp_path / "strict")


@pytest.mark.parametrize("level, mode, warned", [(0.5, "weight", True), (0.9, "weight", False), (0.95, "weight", False),
                                                 (0.5, "unit", False)])
def test_save_pruned_warns_when_a_td_model_is_pruned_below_its_gamma(tmp_path, caplog, level, mode, warned):
    model = tiny_bert()
    patch_model(model, alpha=0.75, gamma=0.9, mode="weight")
    report = prune_model(model, level, mode=mode)
    with caplog.at_level("WARNING", logger="hf_tdrop.hub"):
        out = save_pruned(model, tmp_path / "out", prune_report=report)
    messages = [r.getMessage() for r in caplog.records if "below" in r.getMessage()]
    assert bool(messages) == warned
    meta = json.loads((out / "tdrop_config.json").read_text(encoding="utf-8"))
    assert meta["pruning"].get("below_trained_gamma", False) == warned
    if warned:
        assert len(messages) == 1 and "γ=0.9" in messages[0] and "pruned at 0.5" in messages[0]
