"""shrink_model: dead FFN units physically removed, same outputs, config matches weights, stock reload."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_MODELS, tiny_inputs
from torch import nn

from hf_tdrop import patch_model, prune_model, sparsity_report
from hf_tdrop.hub import auto_class_for
from hf_tdrop.shrink import SUPPORTED_MODEL_TYPES, ShrinkReport, shrink_model


def tiny_t5_gated():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0))


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(
        vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64))


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64))


FACTORIES = {**TINY_MODELS, "t5_gated": tiny_t5_gated, "mistral": tiny_mistral, "qwen2": tiny_qwen2}
INPUTS = {"t5_gated": "t5", "mistral": "llama", "qwen2": "llama"}

# Per architecture, independently of hf_tdrop.shrink: FFN attribute names (up, gate, down) of the
# container module, the config field(s) and the FFN width of the tiny model.
FFN = {
    "bert": (("intermediate.dense", None, "output.dense"), "intermediate_size"),
    "roberta": (("intermediate.dense", None, "output.dense"), "intermediate_size"),
    "vit": (("fc1", None, "fc2"), "intermediate_size"),
    "gpt2": (("c_fc", None, "c_proj"), "n_inner"),
    "t5": (("wi", None, "wo"), "d_ff"),
    "t5_gated": (("wi_1", "wi_0", "wo"), "d_ff"),
    "marian": (("fc1", None, "fc2"), None),
    "bart": (("fc1", None, "fc2"), None),
    "llama": (("up_proj", "gate_proj", "down_proj"), "intermediate_size"),
    "mistral": (("up_proj", "gate_proj", "down_proj"), "intermediate_size"),
    "qwen2": (("up_proj", "gate_proj", "down_proj"), "intermediate_size"),
}


def _get(module, path):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def ffn_blocks(model, arch):
    """[(name, up, gate, down)] for every FFN block of ``model``."""
    (up, gate, down), _ = FFN[arch]
    out = []
    for name, m in model.named_modules():
        u, d = _get(m, up), _get(m, down)
        g = _get(m, gate) if gate else None
        if isinstance(u, nn.Module) and isinstance(d, nn.Module) and (gate is None or g is not None):
            out.append((name, u, g, d))
    return out


def is_conv1d(module):
    return type(module).__name__ == "Conv1D"


def zero_units(module, units):
    """Zero output units ``units`` (weight rows / Conv1D columns and their bias) of a projection."""
    with torch.no_grad():
        if is_conv1d(module):
            module.weight[:, units] = 0
        else:
            module.weight[units] = 0
        if module.bias is not None:
            module.bias[units] = 0


def width(module, as_input=False):
    if is_conv1d(module):
        return module.weight.shape[0 if as_input else 1]
    return module.weight.shape[1 if as_input else 0]


def per_unit_params(up, gate, down):
    """Parameters one FFN unit owns: its up (and gate) row + bias entry and its down column."""
    def row(m):
        fan_in = m.weight.shape[0] if is_conv1d(m) else m.weight.shape[1]
        return fan_in + (1 if m.bias is not None else 0)

    fan_out = down.weight.shape[1] if is_conv1d(down) else down.weight.shape[0]
    return row(up) + (row(gate) if gate is not None else 0) + fan_out


def model_inputs(arch):
    inputs = tiny_inputs(INPUTS.get(arch, arch))
    inputs.pop("labels")
    if arch in ("t5", "t5_gated", "marian", "bart"):
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :5]
    return inputs


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def set_architectures(model):
    model.config.architectures = [type(model).__name__]


@pytest.mark.parametrize("arch", sorted(FFN))
def test_shrink_same_logits_fewer_params_and_stock_reload(arch, tmp_path):
    model = FACTORIES[arch]().eval()
    set_architectures(model)
    blocks = ffn_blocks(model, arch)
    assert blocks
    n_before = width(blocks[0][1])
    removed = 0
    g = torch.Generator().manual_seed(1)
    for _, up, gate, down in blocks:
        dead = torch.randperm(n_before, generator=g)[: n_before // 2]
        zero_units(gate if gate is not None else up, dead)  # gated: a zero gate row kills the unit too
        removed += len(dead) * per_unit_params(up, gate, down)
    inputs = model_inputs(arch)
    reference = logits(model, inputs)
    params = sum(p.numel() for p in model.parameters())

    report = shrink_model(model)

    assert isinstance(report, ShrinkReport)
    assert report.params_before == params
    assert report.params_before - report.params_after == removed
    assert sum(p.numel() for p in model.parameters()) == params - removed
    assert report.file_bytes_after < report.file_bytes_before
    assert [b.width_after for b in report.blocks] == [n_before - n_before // 2] * len(blocks)
    assert report.padded_blocks == []
    torch.testing.assert_close(logits(model, inputs), reference, atol=1e-5, rtol=0)
    # the config describes the new weights
    fields = ["encoder_ffn_dim", "decoder_ffn_dim"] if FFN[arch][1] is None else [FFN[arch][1]]
    for f in fields:
        assert getattr(model.config, f) == n_before - n_before // 2
        assert report.config_changes[f] == [n_before, n_before - n_before // 2]
    for _, up, gate, down in ffn_blocks(model, arch):
        assert width(up) == width(down, as_input=True) == n_before - n_before // 2
        if gate is not None:
            assert width(gate) == width(up)

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for f in fields:
        assert saved[f] == n_before - n_before // 2
    reloaded = auto_class_for(model.config).from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    torch.testing.assert_close(logits(reloaded, inputs), reference, atol=1e-5, rtol=0)


def test_shrink_after_prune_model_unit_mode_bert_and_llama():
    for arch in ("bert", "llama"):
        model = FACTORIES[arch]().eval()
        prune_model(model, 0.5, mode="unit")  # every Linear but the head; gate and up pruned independently
        inputs = model_inputs(arch)
        reference = logits(model, inputs)
        report = shrink_model(model, measure_file_size=False)
        assert report.file_bytes_before is None and report.params_after < report.params_before
        torch.testing.assert_close(logits(model, inputs), reference, atol=1e-5, rtol=0)
        widths = {width(up) for _, up, _, _ in ffn_blocks(model, arch)}
        assert widths == {model.config.intermediate_size}
        if arch == "bert":
            assert model.config.intermediate_size == 24
        else:  # a unit dies if its gate OR its up row is zero: the union of two 24-unit sets
            assert model.config.intermediate_size < 24


def test_gated_union_and_zero_down_column_are_removed():
    model = FACTORIES["llama"]().eval()
    blocks = ffn_blocks(model, "llama")
    for _, up, gate, down in blocks:
        zero_units(gate, [0, 1, 2])
        zero_units(up, [3, 4])
        with torch.no_grad():
            down.weight[:, 5] = 0  # unit 5 feeds nothing into the output
    inputs = model_inputs("llama")
    reference = logits(model, inputs)
    report = shrink_model(model, measure_file_size=False)
    assert model.config.intermediate_size == 48 - 6
    assert [b.dead_units for b in report.blocks] == [6, 6]
    torch.testing.assert_close(logits(model, inputs), reference, atol=1e-5, rtol=0)


def test_uneven_widths_pad_to_widest_or_raise():
    model = FACTORIES["bert"]().eval()
    (_, up0, _, _), (_, up1, _, _) = ffn_blocks(model, "bert")
    zero_units(up0, list(range(24)))   # layer 0: 24 dead
    zero_units(up1, list(range(12)))   # layer 1: 12 dead
    inputs = model_inputs("bert")
    reference = logits(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(ValueError, match="different widths.*on_uneven='pad'"):
        shrink_model(model, on_uneven="raise")
    assert model.config.intermediate_size == 48
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    report = shrink_model(model, measure_file_size=False)
    assert model.config.intermediate_size == 36
    assert [(b.dead_units, b.width_after, b.padded_units) for b in report.blocks] == [(24, 36, 12), (12, 36, 0)]
    assert report.padded_blocks == ["bert.encoder.layer.0"]
    assert "narrower block" in report.to_markdown()
    assert width(up0) == width(up1) == 36
    torch.testing.assert_close(logits(model, inputs), reference, atol=1e-5, rtol=0)


def test_zero_row_with_nonzero_bias_is_kept():
    model = FACTORIES["bert"]().eval()
    blocks = ffn_blocks(model, "bert")
    for _, up, _, _ in blocks:
        zero_units(up, [0, 1, 2, 3])
        with torch.no_grad():
            up.bias[0] = 0.5  # act(0.5) != 0: unit 0 still contributes
    inputs = model_inputs("bert")
    reference = logits(model, inputs)
    report = shrink_model(model, measure_file_size=False)
    assert [b.dead_units for b in report.blocks] == [3, 3]
    assert model.config.intermediate_size == 45
    torch.testing.assert_close(logits(model, inputs), reference, atol=1e-5, rtol=0)


def test_refuses_activation_nonzero_at_zero():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, hidden_act="sigmoid")).eval()
    zero_units(ffn_blocks(model, "bert")[0][1], [0, 1])
    with pytest.raises(ValueError, match=r"act\(0\) != 0"):
        shrink_model(model)
    assert model.config.intermediate_size == 48 and width(ffn_blocks(model, "bert")[0][1]) == 48


def test_no_dead_units_changes_nothing():
    model = FACTORIES["gpt2"]().eval()
    params = sum(p.numel() for p in model.parameters())
    report = shrink_model(model, measure_file_size=False)
    assert report.config_changes == {} and report.params_after == params
    assert model.config.n_inner is None


@pytest.mark.parametrize("arch", ["gpt2", "t5", "bert"])
@pytest.mark.parametrize("prune", [False, True], ids=["nothing-to-shrink", "unit-pruned"])
def test_measuring_file_size_changes_neither_config_nor_weights(arch, prune):
    """The two internal save_pretrained calls of measure_file_size=True leave no trace: the config
    (no added `architectures`/`dtype`), the generation config and the state_dict are what shrinking
    alone gives (measure_file_size=False)."""
    def run(measure):
        torch.manual_seed(0)
        model = FACTORIES[arch]().eval()
        if prune:
            for _, up, _, _ in ffn_blocks(model, arch):
                zero_units(up, list(range(width(up) // 2)))
        config_before = model.config.to_dict()
        generation_before = getattr(model, "generation_config", None)
        generation_before = None if generation_before is None else generation_before.to_dict()
        report = shrink_model(model, measure_file_size=measure)
        generation = getattr(model, "generation_config", None)
        return (model, config_before, model.config.to_dict(),
                generation_before, None if generation is None else generation.to_dict(), report)

    measured, before, after, gen_before, gen_after, report = run(True)
    plain, _, plain_after, _, plain_gen_after, _ = run(False)
    assert report.file_bytes_before > 0 and report.file_bytes_after > 0
    assert after == plain_after and gen_after == plain_gen_after
    if not prune:
        assert after == before and gen_after == gen_before
    assert measured.state_dict().keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(measured.state_dict()[key], value), key


def test_marian_encoder_and_decoder_widths_are_separate():
    model = FACTORIES["marian"]().eval()
    for name, up, _, _ in ffn_blocks(model, "marian"):
        zero_units(up, list(range(24 if ".encoder." in f".{name}." else 12)))
    inputs = model_inputs("marian")
    reference = logits(model, inputs)
    report = shrink_model(model, measure_file_size=False)
    assert (model.config.encoder_ffn_dim, model.config.decoder_ffn_dim) == (24, 36)
    assert report.config_changes == {"encoder_ffn_dim": [48, 24], "decoder_ffn_dim": [48, 36]}
    torch.testing.assert_close(logits(model, inputs), reference, atol=1e-5, rtol=0)


def test_unsupported_patched_and_bad_arguments():
    with pytest.raises(ValueError, match=r"model type 'resnet'.*supported model types"):
        shrink_model(FACTORIES["resnet"]())
    model = FACTORIES["bert"]()
    patch_model(model, alpha=0.5, gamma=0.5, mode="unit")
    with pytest.raises(ValueError, match="unpatch_model"):
        shrink_model(model)
    with pytest.raises(ValueError, match="on_uneven"):
        shrink_model(FACTORIES["bert"](), on_uneven="widest")
    with pytest.raises(ValueError, match="measure_file_size"):
        shrink_model(FACTORIES["bert"](), measure_file_size="yes")
    with pytest.raises(TypeError):
        shrink_model("bert")
    assert set(SUPPORTED_MODEL_TYPES) >= {"bert", "roberta", "gpt2", "t5", "marian", "bart", "vit", "llama"}


def test_report_serialises_and_sparsity_after_shrink():
    model = FACTORIES["bert"]().eval()
    prune_model(model, 0.5, mode="unit", target_modules="intermediate.dense")
    report = shrink_model(model)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["params_removed"] == 2 * 24 * (32 + 1 + 32)
    assert data["blocks"][0]["width_after"] == 24
    assert "intermediate_size: 48 -> 24" in str(report)
    # the shrunk FFN has no zero unit left
    after = {layer.name: layer for layer in sparsity_report(model).layers}
    assert after["bert.encoder.layer.0.intermediate.dense"].zero_units == 0
