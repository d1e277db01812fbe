"""Evaluation for ``wmt_en_de.py``: sacreBLEU and teacher-forced token accuracy on a split, the
per-epoch validation curve, the pruning sweeps of a trained model (its fourth step) and
``--combine_runs`` (finished sweeps side by side).

Imports torch and ``hf_tdrop``: the script imports it after its flags are parsed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from accelerate.logging import get_logger
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import hf_tdrop
from hf_tdrop import SweepResult, combine_sweeps, plot_sweeps, prune_sweep
from translation_presets import SWEEP_FILE

logger = get_logger("wmt_en_de")


# --------------------------------------------------------------------------------------------------
# one split
# --------------------------------------------------------------------------------------------------


def make_eval_dataloader(dataset, collator, args, accelerator):
    """Length-sorted (fast generation) eval loader; ``idx`` keeps the original order."""
    dataset = dataset.sort("src_len", reverse=True)
    loader = DataLoader(dataset.remove_columns(["src_len"]), collate_fn=collator, batch_size=args.per_device_eval_batch_size)
    return accelerator.prepare(loader)


def generation_budget(attention_mask, args) -> int:
    """New-token limit for one batch, ``min(max_target_length, floor(a * longest source) + b)`` (fairseq's
    ``--max-len-a/--max-len-b``). ``attention_mask``: (batch, source_len)."""
    longest = int(attention_mask.sum(dim=1).max()) if attention_mask.numel() else 0
    return max(1, min(args.max_target_length, int(args.max_length_a * longest) + args.max_length_b))


@torch.no_grad()
def evaluate(model, loader, tokenizer, references, sources, args, accelerator, translations_path=None):
    """Corpus sacreBLEU (detokenised) and teacher-forced per-token accuracy on one split.

    Returns ``{"bleu": ..., "token_accuracy": ...}`` on every process; the main process writes
    ``translations_path`` (TSV: source, reference, hypothesis in the split's order)."""
    import sacrebleu

    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    hyps: dict[int, str] = {}
    correct = total = 0
    gen_kwargs = dict(num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=True)
    for batch in tqdm(loader, desc="eval", leave=False, disable=not accelerator.is_local_main_process):
        labels = batch["labels"]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=unwrapped.prepare_decoder_input_ids_from_labels(labels=labels))
        mask = labels.ne(-100)
        per_example = torch.stack([(out.logits.argmax(-1).eq(labels) & mask).sum(1), mask.sum(1)], dim=1)
        per_example = accelerator.gather_for_metrics(per_example)
        correct += int(per_example[:, 0].sum())
        total += int(per_example[:, 1].sum())
        generated = unwrapped.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=generation_budget(batch["attention_mask"], args), **gen_kwargs)
        generated = accelerator.pad_across_processes(generated, dim=1, pad_index=tokenizer.pad_token_id)
        generated, idx = accelerator.gather_for_metrics((generated, batch["idx"]))
        for i, text in zip(idx.tolist(), tokenizer.batch_decode(generated, skip_special_tokens=True)):
            hyps[i] = text.strip()
    if len(hyps) != len(references):
        raise RuntimeError(f"Got {len(hyps)} translations for {len(references)} references.")
    ordered = [hyps[i] for i in range(len(references))]
    bleu = sacrebleu.BLEU()
    score = bleu.corpus_score(ordered, [references])
    if translations_path is not None and accelerator.is_main_process:
        Path(translations_path).parent.mkdir(parents=True, exist_ok=True)
        with open(translations_path, "w", encoding="utf-8") as f:
            f.write("source\treference\thypothesis\n")
            for s, r, h in zip(sources, references, ordered):
                f.write(f"{s}\t{r}\t{h}\n")
    return {"bleu": score.score, "token_accuracy": correct / max(total, 1)}, bleu.get_signature()


@torch.no_grad()
def validation_metrics(model, loader, args, accelerator) -> dict:
    """Teacher-forced loss (label-smoothed, as in training, and plain) and per-token accuracy on one
    split: a cheap learning curve, logged at the end of every epoch."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    totals = torch.zeros(4, dtype=torch.float64)
    for batch in loader:
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=unwrapped.prepare_decoder_input_ids_from_labels(labels=labels)).logits.float()
        flat, target = logits.view(-1, logits.size(-1)), labels.view(-1)
        mask = labels.ne(-100)
        smoothed = torch.nn.functional.cross_entropy(flat, target, ignore_index=-100, reduction="none",
                                                     label_smoothing=args.label_smoothing).view_as(labels)
        nll = torch.nn.functional.cross_entropy(flat, target, ignore_index=-100, reduction="none").view_as(labels)
        correct = logits.argmax(-1).eq(labels) & mask
        per_example = torch.stack([smoothed.sum(1), nll.sum(1), correct.sum(1).float(), mask.sum(1).float()], dim=1)
        totals += accelerator.gather_for_metrics(per_example).double().sum(0).cpu()  # each example once
    n = max(float(totals[3]), 1.0)
    return {"validation_loss": round(float(totals[0]) / n, 4), "validation_nll": round(float(totals[1]) / n, 4),
            "validation_token_accuracy": round(float(totals[2]) / n, 4)}


# --------------------------------------------------------------------------------------------------
# the sweeps of a run
# --------------------------------------------------------------------------------------------------


def run_name_of(args):
    if args.run_name:
        return args.run_name
    if getattr(args, "method_spec", None) is not None:
        return args.method_spec.label
    return "none" if args.td_mode == "none" else f"targeted α={args.td_alpha:g} γ={args.td_gamma:g}"


def sweep_criterion(model, mode: str) -> str:
    """The pruning criterion of a sweep: the learned one the finalised model carries for ``mode``
    (L0 ``gates``, variational ``log_alpha``; weight mode), else ``magnitude``."""
    for module in model.modules():
        for value in vars(module).values():  # finalize_model leaves a LearnedCriterion on each such layer
            if isinstance(value, hf_tdrop.LearnedCriterion) and value.granularity == mode:
                return value.name
    return "magnitude"


def run_sweeps(args, model, tokenizer, raw, processed, collator, accelerator, output_dir: Path) -> dict:
    """Step 4: at every level of ``--sweep_sparsities``, for every ``--sweep_modes`` and eval split:
    sacreBLEU and token accuracy; writes sweeps/ and translations/. Returns the summary."""
    run_name = run_name_of(args)
    src, tgt = args.source_lang, args.target_lang
    summary = {"run_name": run_name, "sweeps": {}}
    eval_splits = [s for s in args.eval_splits if s in raw] if args.do_sweep else []
    for split in eval_splits:
        loader = make_eval_dataloader(processed[split], collator, args, accelerator)
        references = [ex[tgt] for ex in raw[split]["translation"]]
        sources = [ex[src] for ex in raw[split]["translation"]]
        for mode in args.sweep_modes:
            levels = list(args.sweep_sparsities)
            calls = iter(levels)
            signature = {}

            def evaluate_fn(m, split=split, mode=mode, loader=loader, references=references, sources=sources,
                            calls=calls, signature=signature):
                level = next(calls)
                path = output_dir / "translations" / f"{split}-{mode}-{round(100 * level):02d}.tsv"
                metrics, sig = evaluate(model, loader, tokenizer, references, sources, args, accelerator, path)
                signature["sacrebleu"] = sig
                logger.info(f"[{split}] {mode} pruning {100 * level:.0f}%: BLEU {metrics['bleu']:.2f}, "
                            f"token accuracy {metrics['token_accuracy']:.4f}")
                return metrics

            t0 = time.time()
            criterion = sweep_criterion(accelerator.unwrap_model(model), mode)
            result = prune_sweep(accelerator.unwrap_model(model), evaluate_fn, levels, mode=mode, run_name=run_name,
                                 method=criterion, progress=accelerator.is_local_main_process)
            seconds = time.time() - t0
            logger.info(f"sacreBLEU signature: {signature.get('sacrebleu')}")
            if accelerator.is_main_process:
                result.save(output_dir / "sweeps", prefix=SWEEP_FILE.format(split=split, mode=mode))
                accelerator.print(f"\n[{split}, {len(references)} sentences, {mode} pruning, {run_name}]\n{result}\n")
            summary["sweeps"][f"{split}-{mode}"] = {"n_sentences": len(references), "seconds": round(seconds, 1),
                                                    "sacrebleu_signature": signature.get("sacrebleu"),
                                                    **result.to_dict()}
        accelerator.wait_for_everyone()
    return summary


# --------------------------------------------------------------------------------------------------
# --combine_runs
# --------------------------------------------------------------------------------------------------


def combine_runs(args):
    """Write paper-shaped tables (rows = prune %, columns = runs) for every split/mode/metric."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    found: dict[str, list] = {}
    for run_dir in args.combine_runs:
        files = sorted(Path(run_dir).glob("sweeps/sweep-*.json"))
        if not files:
            raise FileNotFoundError(f"--combine_runs: no sweeps/sweep-*.json in {run_dir!r} (is the run finished?).")
        for f in files:
            found.setdefault(f.stem, []).append(SweepResult.from_json(f))
    names = [SweepResult.from_json(next(Path(d).glob("sweeps/sweep-*.json"))).run_name for d in args.combine_runs]
    if len(set(names)) != len(names):  # same run names: label the columns by run folder (then by position)
        names = [f"{Path(d).name}: {n}" for d, n in zip(args.combine_runs, names)]
        if len(set(names)) != len(names):
            names = [f"{i + 1}. {n}" for i, n in enumerate(names)]
    summary = {}
    for stem, results in sorted(found.items()):
        if len(results) != len(args.combine_runs):
            # no Accelerator here (combining runs starts none): the standard library's logger
            logging.getLogger("wmt_en_de").warning(f"{stem}: only {len(results)} of {len(args.combine_runs)} runs have it; "
                                                "skipped")
            continue
        for metric in results[0].metric_names():
            table = combine_sweeps(results, metric, labels=names)
            name = f"{stem.replace('sweep-', 'table-')}-{metric}"
            (out / f"{name}.md").write_text(table.to_markdown(float_format=".2f" if metric == "bleu" else ".4f") + "\n")
            table.to_csv(out / f"{name}.csv")
            table.to_json(out / f"{name}.json")
            summary[name] = table.to_dict()
        plot_sweeps(results, out / f"{stem.replace('sweep-', 'plot-')}.png", labels=names, title=stem.replace("sweep-", ""))
        print(f"\n## {stem}\n")
        for metric in results[0].metric_names():
            print(combine_sweeps(results, metric, labels=names).to_markdown(float_format=".2f" if metric == "bleu" else ".4f"), "\n")
    return summary
