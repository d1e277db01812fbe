"""What the documentation's code fragments take as given, on tiny models.

A guide's block marked ``<!-- test: run given NAME -->`` uses names it does not define (``model``,
``train_dataset``, ``trainer``, ...): the page says what they are, and ``FIXTURES[NAME](cwd)`` makes
them, small enough for the test suite. Each fixture returns the names as a dict; files it writes go
into ``cwd``. Seeded, so that every process of a distributed block builds the same model.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(59)]]


def _bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=num_labels))


def _examples(n: int = 32, seq: int = 8, seed: int = 1) -> list[dict]:
    """A learnable task: the label says whether token 5 occurs in the sequence."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(6, len(VOCAB), (seq,), generator=g)
        label = int(torch.rand((), generator=g) < 0.5)
        if label:
            ids[int(torch.randint(1, seq, (), generator=g))] = 5
        ids[0] = 2
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long),
                     "labels": torch.tensor(label)})
    return rows


def _loader(rows: list[dict], batch_size: int = 8):
    from transformers import default_data_collator

    return torch.utils.data.DataLoader(rows, batch_size=batch_size, collate_fn=default_data_collator)


def _evaluate(rows: list[dict]):
    batch = _loader(rows, len(rows)).__iter__().__next__()

    def evaluate(m):
        m.eval()
        with torch.no_grad():
            out = m(**batch)
        return {"accuracy": (out.logits.argmax(-1) == batch["labels"]).float().mean().item(), "loss": out.loss.item()}
    return evaluate


def _training_args(output_dir: str = "out", **kwargs):
    from transformers import TrainingArguments

    defaults = dict(report_to="none", num_train_epochs=1, per_device_train_batch_size=8, save_strategy="no",
                    disable_tqdm=True, use_cpu=True)
    return TrainingArguments(output_dir, **{**defaults, **kwargs})


def _tokenizer(cwd: Path):
    from transformers import BertTokenizerFast

    vocab = cwd / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(vocab))


def bert_dataset(cwd: Path) -> dict:
    """``model``: a BERT classifier; ``train_dataset`` / ``train_ds``: its labelled examples."""
    torch.manual_seed(0)
    rows = _examples()
    return {"model": _bert(), "train_dataset": rows, "train_ds": rows}


def bert_2_4(cwd: Path) -> dict:
    """``model``: a BERT classifier whose Linear layers have shapes the 2:4 sparse kernels take."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return {"model": BertForSequenceClassification(BertConfig(
        vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
        max_position_embeddings=32, num_labels=2))}


def bert_loop(cwd: Path) -> dict:
    """``model``, ``optimizer`` (AdamW), ``loader`` (a DataLoader of batches with labels) and
    ``accelerator`` (``accelerate.Accelerator()``; in a distributed process, each rank its own half of
    the examples and no accelerator)."""
    import torch.distributed as dist

    torch.manual_seed(0)
    model = _bert()
    rows = _examples()
    names = {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3)}
    if dist.is_initialized():
        names["loader"] = _loader(rows[dist.get_rank()::dist.get_world_size()], 4)
        return names
    from accelerate import Accelerator

    return {**names, "loader": _loader(rows), "accelerator": Accelerator(cpu=True)}


def l0_loop(cwd: Path) -> dict:
    """``bert_loop`` with the model patched with unit L0 gates and an optimizer that trains them."""
    from hf_tdrop import L0Config, method_optimizer, patch_model

    names = bert_loop(cwd)
    patch_model(names["model"], config=L0Config(dataset_size=32, mode="unit", l0=0.1))
    names["optimizer"] = method_optimizer(names["model"], optimizer_cls=torch.optim.AdamW,
                                          optimizer_kwargs={"lr": 1e-3})
    return names


def bert_trainer(cwd: Path) -> dict:
    """``model``, ``train_dataset``, ``args`` (one epoch, nothing reported) and ``trainer``."""
    from transformers import Trainer

    names = bert_dataset(cwd)
    args = _training_args()
    return {**names, "args": args,
            "trainer": Trainer(model=names["model"], args=args, train_dataset=names["train_dataset"])}


def _l0_trained(cwd: Path, mode: str) -> dict:
    """``bert_dataset`` patched with L0 gates (per weight or per unit), trained one epoch by a
    ``trainer`` whose optimizer trains the gates; the model stays patched."""
    from transformers import Trainer

    from hf_tdrop import L0Config, RegularizationCallback, method_optimizer, patch_model

    names = bert_dataset(cwd)
    model = names["model"]
    patch_model(model, config=L0Config(dataset_size=32, mode=mode, l0=0.1))
    args = _training_args("l0-out", learning_rate=1e-3, optim="adamw_torch")
    trainer = Trainer(model=model, args=args, train_dataset=names["train_dataset"],
                      callbacks=[RegularizationCallback()], optimizers=(method_optimizer(model, args), None))
    trainer.train()
    return {**names, "trainer": trainer}


def l0_trained(cwd: Path) -> dict:
    """``model`` trained with per-weight L0 gates (still patched), its ``trainer``, and
    ``evaluate(model)`` (accuracy and loss on the examples)."""
    names = _l0_trained(cwd, "weight")
    return {**names, "evaluate": _evaluate(names["train_dataset"])}


def l0_unit_trainer(cwd: Path) -> dict:
    """``model`` trained with per-unit L0 gates (still patched) and its ``trainer``."""
    return _l0_trained(cwd, "unit")


def bert_eval_loader(cwd: Path) -> dict:
    """``model`` (a BERT classifier) and ``eval_loader`` (batches with ``labels``)."""
    torch.manual_seed(0)
    return {"model": _bert(), "eval_loader": _loader(_examples(seed=2))}


def batchnorm_cnn(cwd: Path) -> dict:
    """``model`` (a ResNet with BatchNorm layers), ``train_loader`` (batches of ``pixel_values`` and
    ``labels``) and ``evaluate(model)``."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=4))
    g = torch.Generator().manual_seed(3)
    rows = [{"pixel_values": torch.randn(3, 16, 16, generator=g) + 0.5, "labels": torch.tensor(i % 4)}
            for i in range(32)]
    batch = _loader(rows, 32).__iter__().__next__()

    def evaluate(m):
        m.eval()
        with torch.no_grad():
            return (m(**batch).logits.argmax(-1) == batch["labels"]).float().mean().item()
    return {"model": model, "train_loader": _loader(rows), "evaluate": evaluate}


def pruned_bert(cwd: Path) -> dict:
    """What the pruning and shrinking guides leave: a BERT trained with unit targeted dropout on its
    feed-forward layers (``td_config``, ``schedule``), pruned (``prune_report``) and shrunk
    (``report``), its ``tokenizer`` and a ``sweep``."""
    from hf_tdrop import (TargetedDropoutConfig, TargetingSchedule, patch_model, prune_model, prune_sweep,
                          shrink_model, unpatch_model)

    torch.manual_seed(0)
    model = _bert()
    schedule = TargetingSchedule(alpha=0.9, gamma=0.5, kind="linear", ramp_steps=100)
    patch_model(model, config=TargetedDropoutConfig(alpha=0.9, gamma=0.5, mode="unit",
                                                     target_modules=["intermediate.dense"]))
    sweep = prune_sweep(model, _evaluate(_examples()), sparsities=(0.0, 0.5), mode="unit")
    td_config = model.tdrop_config
    prune_report = prune_model(model, 0.5, mode="unit")
    unpatch_model(model)
    report = shrink_model(model)
    return {"model": model, "tokenizer": _tokenizer(cwd), "prune_report": prune_report, "report": report,
            "sweep": sweep, "td_config": td_config, "schedule": schedule}


def gpt2_td_checkpoint(cwd: Path) -> dict:
    """A folder ``gpt2-td``: a GPT-2 (12 blocks, as GPT-2 small, but 64 wide) patched with unit
    targeted dropout on its MLP up projections (``.*\\.mlp\\.c_fc``), saved as
    ``trainer.save_model()`` saves it, with the ``tdrop_training_config.json`` that
    ``TargetedDropoutCallback`` writes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_tdrop import TargetedDropoutConfig, patch_model

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(VOCAB), n_positions=32, n_embd=64, n_layer=12, n_head=2,
                                       bos_token_id=2, eos_token_id=3))
    patch_model(model, config=TargetedDropoutConfig(alpha=0.66, gamma=0.5, mode="unit",
                                                     target_modules=[r".*\.mlp\.c_fc"]))
    model.save_pretrained(cwd / "gpt2-td")
    model.tdrop_config.save_pretrained(cwd / "gpt2-td")
    return {}


FIXTURES = {f.__name__: f for f in (bert_dataset, bert_2_4, bert_loop, l0_loop, bert_trainer, l0_trained, l0_unit_trainer,
                                      bert_eval_loader, batchnorm_cnn, pruned_bert, gpt2_td_checkpoint)}
