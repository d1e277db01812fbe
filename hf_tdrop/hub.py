"""Save and publish pruned models: a plain ``transformers`` checkpoint, ``tdrop_config.json`` and a model card.

:func:`save_pruned` writes, into one directory:

* the model with ``save_pretrained`` (safetensors) -- stock ``transformers`` loads it, no hf_tdrop
  code needed (a patched model saves its original ``state_dict``);
* the tokenizer / processor, when given;
* ``tdrop_config.json``: what was done (pruning mode, method, sparsity and pruned layers, and for N:M
  pruning ``n``, ``m`` and whether the saved layers have the exact pattern; the
  targeted-dropout settings α, γ and schedule used in training; sparsity totals; the shrink report);
* ``README.md``: a model card with Hub metadata (``library_name: transformers``, tags
  ``hf-tdrop``/``targeted-dropout``/``pruned``, ``base_model``) and the sparsity report, shrink report
  and pruning-sweep table/plot;
* ``sweep.md/.csv/.json/.png`` when a sweep is given;
* ``tdrop_criteria.safetensors`` when layers carry learned pruning scores (L0 gates, variational
  dropout's ``log α``; see :func:`save_learned_criteria`), so the saved model can be pruned by them
  again (:func:`load_learned_criteria`, ``hf-tdrop prune --method gates``).

:func:`push_pruned_to_hub` writes the same folder to a temporary directory and uploads it with
``huggingface_hub.HfApi.upload_folder``. The token comes from the argument or from the usual
Hugging Face places (``HF_TOKEN``, ``huggingface-cli login``); it is never printed or written.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from torch import nn

from . import __version__
from ._utils import PathLike, check_output_dir, write_json
from .config import check_mode, check_nm
from .constants import (
    CONFIG_ATTR,
    CRITERIA_NAME,
    LEGACY_CRITERIA_NAME,
    METHOD_ATTR,
    MODEL_CARD_NAME,
    TDROP_CONFIG_NAME,
    TARGETED_DROPOUT,
    TDROP_FORMAT,
    TRAINING_CONFIG_KEY,
)
from .criteria import _learned_criteria_of, _write_criteria, criteria_file, load_learned_criteria, save_learned_criteria
from .methods.base import MethodConfig, config_from_dict, method_layers
from .nm import check_nm_sparsity
from .patching import get_targeting, is_patched, targeted_layers
from .pruning import PruneReport, check_group_fraction, check_method, check_sparsity
from .reports import sparsity_report
from .shrink import ShrinkReport
from .sweeps import SweepResult, combine_sweeps, plot_sweeps

__all__ = ["CRITERIA_NAME", "LEGACY_CRITERIA_NAME", "TDROP_CONFIG_NAME", "TDROP_FORMAT", "TRAINING_CONFIG_KEY",
           "auto_class_for", "check_output_dir", "criteria_file", "load_learned_criteria", "push_pruned_to_hub",
           "save_learned_criteria", "save_pruned"]

logger = logging.getLogger(__name__)

SWEEP_PREFIX = "sweep"
CARD_TAGS = ("hf-tdrop", "targeted-dropout", "pruned")



# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def _check_sweep(sweep: Any) -> Optional[list]:
    if sweep is None:
        return None

    runs = [sweep] if isinstance(sweep, SweepResult) else sweep
    if isinstance(runs, (str, bytes)) or not isinstance(runs, Sequence) or not runs or \
            not all(isinstance(r, SweepResult) for r in runs):
        raise ValueError(
            f"`sweep` must be None, a SweepResult (from hf_tdrop.prune_sweep) or a non-empty list of them, "
            f"got {type(sweep).__name__}."
        )
    return list(runs)


def _check_training_config(model: nn.Module, training_config: Any) -> Optional[MethodConfig]:
    if training_config is None:
        found = getattr(model, CONFIG_ATTR, None)
        return _as_applied(model, found) if isinstance(found, MethodConfig) else None
    if isinstance(training_config, MethodConfig):
        return training_config
    if isinstance(training_config, Mapping):
        return config_from_dict(dict(training_config))
    raise ValueError(
        f"`training_config` must be None, a TargetedDropoutConfig (or another method's config) or a dict of its "
        f"fields, got {type(training_config).__name__}."
    )


def _as_applied(model: nn.Module, config: MethodConfig) -> MethodConfig:
    """``config`` with the α/γ its patched layers hold now (what training last applied, e.g. the
    schedule's values), when every layer agrees; ``config`` itself otherwise."""
    import dataclasses


    if not is_patched(model):
        return config
    try:
        applied = get_targeting(model)
    except ValueError:  # layers disagree or carry no α/γ: nothing single to record
        return config
    if (applied["alpha"], applied["gamma"]) == (config.alpha, config.gamma):
        return config
    return dataclasses.replace(config, alpha=applied["alpha"], gamma=applied["gamma"], extra=dict(config.extra))


def _json_ready(name: str, value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be JSON-serialisable (numbers, strings, lists, dicts): {err}") from None
    return value


def _pruning_info(prune_report: Any, sparsity: Any, mode: Any, method: Any, n: Any = None,
                  m: Any = None) -> Optional[dict]:

    if prune_report is not None and not isinstance(prune_report, PruneReport):
        raise ValueError(f"`prune_report` must be None or a PruneReport (from prune_model), got {type(prune_report).__name__}.")
    info: dict = {}
    if prune_report is not None:
        info = {"sparsity": prune_report.sparsity, "mode": prune_report.mode, "method": prune_report.method,
                "target_source": prune_report.target_source, "target_modules": prune_report.target_modules,
                "exclude_modules": prune_report.exclude_modules,
                "layers": [layer.name for layer in prune_report.layers],
                "pruned_fraction": prune_report.pruned_fraction}
        if prune_report.mode == "nm":
            info.update(n=prune_report.n, m=prune_report.m)
    if mode is not None:
        check_mode(mode)
    nm_mode = (mode if mode is not None else info.get("mode")) == "nm"
    if (n is not None or m is not None) and not nm_mode:
        raise ValueError("`n`/`m` record an N:M pattern: they need mode='nm' (or an nm prune_report).")
    if nm_mode and prune_report is None:
        n, m = check_nm(2 if n is None else n, 4 if m is None else m)
    elif n is not None or m is not None:
        n, m = check_nm(info["n"] if n is None else n, info["m"] if m is None else m)
    check_fraction = check_group_fraction if nm_mode else check_sparsity
    for key, value, check in (("sparsity", sparsity, check_fraction), ("mode", mode, check_mode),
                              ("method", method, check_method), ("n", n, None), ("m", m, None)):
        if value is None:
            continue
        value = check(value) if check is not None else value
        if key in info and info[key] != value:
            raise ValueError(f"`{key}`={value!r} disagrees with prune_report.{key}={info[key]!r}.")
        info[key] = value
    return info or None


def _nm_check(model: nn.Module, pruning: Optional[dict]) -> Optional[dict]:
    """For N:M pruning: whether the pruned layers (all default layers without a report) still have
    the exact pattern, recorded next to the settings."""
    if not pruning or pruning.get("mode") != "nm":
        return None

    names = pruning.get("layers")
    report = check_nm_sparsity(model, pruning["n"], pruning["m"],
                               target_modules=[f"^{re.escape(x)}$" for x in names] if names else None)
    return {"exact": report.ok, "n_groups": report.n_groups, "violating_groups": report.violating_groups,
            "failing_layers": report.failing_layers}


# --------------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------------


def _architecture(model: nn.Module) -> Optional[str]:
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return archs[0] if archs else type(model).__name__


_PREFERRED_AUTO = (
    "AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification", "AutoModelForQuestionAnswering", "AutoModelForMaskedLM",
    "AutoModelForImageClassification", "AutoModelForSpeechSeq2Seq",
)


def auto_class_for(config):
    """The ``transformers`` Auto class whose mapping sends ``config.model_type`` to ``config.architectures[0]``
    (task-specific classes first); ``AutoModel`` when there is no architecture or no match."""
    import transformers
    from transformers.models.auto import modeling_auto

    archs = getattr(config, "architectures", None) or []
    model_type = getattr(config, "model_type", None)
    if archs and model_type:
        others = sorted(n for n in dir(modeling_auto) if n.startswith("AutoModelFor") and n not in _PREFERRED_AUTO)
        others.sort(key=lambda n: n == "AutoModelForPreTraining")  # generic: after every task class
        for name in list(_PREFERRED_AUTO) + others + ["AutoModel"]:
            auto_cls = getattr(modeling_auto, name, None)
            mapping = getattr(getattr(auto_cls, "_model_mapping", None), "_model_mapping", None)
            if not isinstance(mapping, dict):
                continue
            target = mapping.get(model_type)
            targets = target if isinstance(target, (list, tuple)) else [target]
            if archs[0] in targets:
                return auto_cls
    return transformers.AutoModel


def _auto_class_name(model: nn.Module) -> str:
    """Name of the transformers Auto class that maps this model's architecture (fallback ``AutoModel``)."""
    config = getattr(model, "config", None)
    if config is None:
        return "AutoModel"
    return auto_class_for(config).__name__


def _fmt_num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _sweep_markdown(runs: list) -> str:

    if len(runs) == 1:
        return runs[0].to_markdown()
    common = [m for m in runs[0].metrics if all(m in r.metrics for r in runs)]
    return "\n\n".join(combine_sweeps(runs, metric).to_markdown() for metric in common)


def _patterns_md(patterns: Any) -> str:
    """Layer patterns for a Markdown table cell: each as a code span, as written (pipes escaped)."""
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    return ", ".join("`" + str(p).replace("|", "\\|") + "`" for p in items)


def _model_card(model: nn.Module, meta: dict, *, base_model: Optional[str], repo_id: Optional[str],
                sparsity_md: Optional[str], shrink_md: Optional[str], sweep_md: Optional[str],
                sweep_png: Optional[str]):
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(library_name="transformers", tags=list(CARD_TAGS), base_model=base_model)
    title = repo_id.split("/")[-1] if repo_id else (f"Pruned {base_model}" if base_model else "Pruned model")
    pruning, training = meta.get("pruning"), meta.get(TRAINING_CONFIG_KEY)
    lines = [f"# {title}", ""]
    intro = ("This model was pruned with [hf-tdrop](https://pypi.org/project/hf-tdrop/), Targeted Dropout "
             "(Gomez et al., 2019, [arXiv:1905.13678](https://arxiv.org/abs/1905.13678)) for Hugging Face "
             "Transformers.")
    if base_model:
        intro += f" Base model: [`{base_model}`](https://huggingface.co/{base_model})."
    lines += [intro, "", "It is a plain `transformers` checkpoint: no hf-tdrop code is needed to load it.", ""]

    rows = []
    if pruning:
        labels = {"mode": "pruning mode", "method": "pruning method", "sparsity": "target sparsity (per layer)",
                  "pruned_fraction": "pruned fraction of targeted weights"}
        if pruning.get("mode") == "nm":
            labels["sparsity"] = "fraction of groups pruned to N:M (per layer)"
        for key, label in labels.items():
            if key in pruning:
                rows.append((label, _fmt_num(pruning[key])))
        if pruning.get("mode") == "nm":
            exact = pruning.get("nm_check", {}).get("exact")
            note = "" if exact is None else (" (exact in every pruned layer)" if exact else f" (NOT exact: see {TDROP_CONFIG_NAME})")
            rows.append(("N:M pattern", f"{pruning['n']}:{pruning['m']}{note}"))
        if "layers" in pruning:
            source = pruning.get("target_source")
            rows.append(("pruned layers", str(len(pruning["layers"])) + (f" ({source})" if source else "")))
        if pruning.get("target_modules") is not None:
            rows.append(("pruned targets", _patterns_md(pruning["target_modules"])))
        if pruning.get("exclude_modules"):
            rows.append(("excluded from pruning", _patterns_md(pruning["exclude_modules"])))
    if training:
        rows += [(label, _fmt_num(value)) for label, value in config_from_dict(training).card_rows()]
        if training.get("target_modules") is not None:
            rows.append(("trained targets", _patterns_md(training["target_modules"])))
    if meta.get("learned_criteria"):
        learned = meta["learned_criteria"]
        rows.append(("learned pruning scores", f"{', '.join(learned['criteria'])} ({len(learned['layers'])} layers, "
                                               f"[`{learned['file']}`]({learned['file']}))"))
    if meta.get("schedule"):
        rows.append(("schedule", f"`{json.dumps(meta['schedule'], sort_keys=True)}`"))
    if rows:
        lines += ["## Pruning", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        lines += ["", f"The full record is in [`{TDROP_CONFIG_NAME}`]({TDROP_CONFIG_NAME}).", ""]
    if shrink_md:
        lines += ["## Shrinking", "",
                  "Dead feed-forward units (all-zero after unit pruning) were physically removed, so this is "
                  "a smaller dense model computing the same outputs as the pruned one.", "", shrink_md, ""]
    if sparsity_md:
        totals = meta["sparsity"]["total"]
        lines += ["## Sparsity", "",
                  f"Over the {totals['n_layers']} supported layers: {totals['weight_sparsity']:.2%} of weights are "
                  f"zero, {totals['unit_sparsity']:.2%} of units are all-zero.", "",
                  "<details><summary>Per-layer sparsity</summary>", "", sparsity_md, "", "</details>", ""]
    if sweep_md:
        lines += ["## Pruning sweep", "", sweep_md, ""]
        if sweep_png:
            lines += [f"![pruning sweep]({sweep_png})", ""]
    auto = _auto_class_name(model)
    lines += ["## Usage", "", "```python", f"from transformers import {auto}", "",
              f'model = {auto}.from_pretrained("{repo_id or "path/to/this/model"}")', "```", ""]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def save_pruned(
    model: nn.Module,
    output_dir: PathLike,
    *,
    tokenizer_or_processor: Any = None,
    sweep: Any = None,
    prune_report: Any = None,
    shrink_report: Any = None,
    sparsity: Optional[float] = None,
    mode: Optional[str] = None,
    method: Optional[str] = None,
    n: Optional[int] = None,
    m: Optional[int] = None,
    training_config: Any = None,
    schedule: Optional[Mapping] = None,
    base_model: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Save a pruned model as a plain checkpoint plus ``tdrop_config.json`` and a model card.

    Args:
        model: a ``transformers`` ``PreTrainedModel`` (patched or not; pruned, shrunk or not).
        output_dir: directory to write; created if missing. Must be empty unless ``overwrite=True``.
        tokenizer_or_processor: anything with ``save_pretrained`` (tokenizer, image processor, processor).
        sweep: a :class:`hf_tdrop.SweepResult` or a list of them: written as ``sweep.md/.csv/.json/.png``
            and shown in the model card (several runs side by side, one table per shared metric).
        prune_report: the :class:`hf_tdrop.PruneReport` returned by ``prune_model`` (mode, method,
            sparsity, the pruned layer names and where they came from (``target_source``,
            ``target_modules``, ``exclude_modules``) go to ``tdrop_config.json``; for nm pruning also ``n``,
            ``m`` and ``nm_check``: whether the saved layers have the exact N:M pattern, see
            :func:`hf_tdrop.check_nm_sparsity`).
        shrink_report: the :class:`hf_tdrop.ShrinkReport` returned by ``shrink_model``.
        sparsity, mode, method, n, m: pruning settings, when no ``prune_report`` is given (must agree
            with it otherwise). ``sparsity`` in [0, 1) (in [0, 1] for nm mode), ``mode`` in ``MODES``,
            ``method`` in ``METHODS``; ``n``/``m`` only for nm mode (default 2:4).
        training_config: the :class:`TargetedDropoutConfig` (or its dict) used in training. Default: the
            model's ``tdrop_config`` attribute set by ``patch_model`` (``unpatch_model`` removes it, so
            pass it explicitly for an unpatched model), with the α/γ its patched layers hold now (the
            values training last applied, e.g. a schedule's targets) when all layers agree.
        schedule: the α/γ schedule used in training: a ``TargetingSchedule`` or a JSON-serialisable dict.
            Default: ``training_config.extra["schedule"]`` when recorded there (``record_schedule``).
        base_model: Hub id of the model this one derives from (model-card metadata).
        overwrite: allow writing into a non-empty ``output_dir`` (files with the same names are replaced,
            others are left alone).

    Layers carrying learned pruning scores (left by :func:`hf_tdrop.finalize_model`) get them written
    to ``tdrop_criteria.safetensors`` (see :func:`save_learned_criteria`; scores that no longer fit a
    shrunk layer are left out with a warning).

    Returns:
        ``output_dir`` as a ``Path``.

    Raises:
        ValueError: a bad argument or a non-empty ``output_dir`` without ``overwrite``. All arguments are
            checked before anything is written.
    """
    return _save_pruned(model, output_dir, repo_id=None, tokenizer_or_processor=tokenizer_or_processor, sweep=sweep,
                        prune_report=prune_report, shrink_report=shrink_report, sparsity=sparsity, mode=mode,
                        method=method, n=n, m=m, training_config=training_config, schedule=schedule,
                        base_model=base_model, overwrite=overwrite)


def pruned_below_gamma(config: Any, pruning: Optional[Mapping]) -> Optional[str]:
    """A one-line warning when a targeted-dropout model is pruned, in the mode it was trained for,
    below its γ; else None.

    A TD model learns to do without its γ lowest (weights of each w_o, or units): pruned at γ it
    loses what it was trained to lose. Below γ, the weights that were targeted but are kept were
    present only ``1 - α`` of the time in training, and the pruned model is often *worse* than at γ.
    """
    if config is None or not pruning or getattr(config, "method", "") != TARGETED_DROPOUT:
        return None
    gamma, mode, level = getattr(config, "gamma", None), getattr(config, "mode", None), pruning.get("sparsity")
    if gamma is None or level is None or mode != pruning.get("mode") or level >= gamma - 1e-9:
        return None
    return (f"the model was trained with {mode} targeted dropout at γ={gamma:g} but is pruned at {level:g}: below "
            f"its γ the weights it was trained to lose are still there (present only 1 - α of the time in "
            f"training), which often costs accuracy; prune it at (or above) γ={gamma:g}.")


def _save_pruned(model: nn.Module, output_dir: PathLike, *, repo_id: Optional[str], tokenizer_or_processor: Any = None,
                 sweep: Any = None, prune_report: Any = None, shrink_report: Any = None,
                 sparsity: Optional[float] = None, mode: Optional[str] = None, method: Optional[str] = None,
                 n: Optional[int] = None, m: Optional[int] = None, training_config: Any = None,
                 schedule: Optional[Mapping] = None, base_model: Optional[str] = None,
                 overwrite: bool = False) -> Path:
    """:func:`save_pruned`; ``repo_id`` (the Hub repo it is pushed to, or None) titles the model card."""


    if not isinstance(model, nn.Module) or not callable(getattr(model, "save_pretrained", None)):
        raise ValueError(f"`model` must be a transformers PreTrainedModel (with save_pretrained), got {type(model).__name__}.")
    out = check_output_dir(output_dir, overwrite)
    if tokenizer_or_processor is not None and not callable(getattr(tokenizer_or_processor, "save_pretrained", None)):
        raise ValueError(
            f"`tokenizer_or_processor` must have a save_pretrained method, got {type(tokenizer_or_processor).__name__}."
        )
    runs = _check_sweep(sweep)

    if shrink_report is not None and not isinstance(shrink_report, ShrinkReport):
        raise ValueError(f"`shrink_report` must be None or a ShrinkReport (from shrink_model), got {type(shrink_report).__name__}.")
    pruning = _pruning_info(prune_report, sparsity, mode, method, n, m)

    with_extra = [(name, getattr(layer, METHOD_ATTR).method) for name, layer in method_layers(model)
                  if getattr(layer, METHOD_ATTR).handler.extra_tensors]
    if with_extra:
        raise ValueError(f"save_pruned: layer {with_extra[0][0]!r} still carries the extra tensors of its training "
                         f"method ({with_extra[0][1]}); call hf_tdrop.finalize_model(model) first, so "
                         "the checkpoint is plain and computes what the trained model computes.")
    config = _check_training_config(model, training_config)
    if schedule is not None and callable(getattr(schedule, "to_dict", None)):
        schedule = schedule.to_dict()  # e.g. a TargetingSchedule
    if schedule is not None and not isinstance(schedule, Mapping):
        raise ValueError(f"`schedule` must be None, a dict or a TargetingSchedule, got {type(schedule).__name__}.")
    if schedule is None and config is not None and isinstance(config.extra.get("schedule"), Mapping):
        schedule = config.extra["schedule"]  # recorded by the Trainer callback / record_schedule
    schedule = _json_ready("schedule", dict(schedule)) if schedule is not None else None
    if base_model is not None and (not isinstance(base_model, str) or not base_model):
        raise ValueError(f"`base_model` must be None or a Hub model id, got {base_model!r}.")


    below = pruned_below_gamma(config, pruning)
    if below is not None:
        logger.warning(below)
        pruning["below_trained_gamma"] = True
    report = sparsity_report(model)
    nm_check = _nm_check(model, pruning)
    if nm_check is not None:
        pruning["nm_check"] = nm_check
    meta = {
        "format": TDROP_FORMAT,
        "hf_tdrop_version": __version__,
        "base_model": base_model,
        "architecture": _architecture(model),
        "pruning": pruning,
        TRAINING_CONFIG_KEY: config.to_dict() if config is not None else None,
        "patched_layers": list(targeted_layers(model)) if is_patched(model) else None,
        "schedule": schedule,
        "sparsity": {"total": report.total, "total_excluding_heads": report.total_excluding_heads},
        "shrink": shrink_report.to_dict() if shrink_report is not None else None,
        "sweep": None,
    }

    criteria = _learned_criteria_of(model, strict=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer_or_processor is not None:
        tokenizer_or_processor.save_pretrained(out)
    if criteria:
        _write_criteria(criteria, out / CRITERIA_NAME)
        meta["learned_criteria"] = {"file": CRITERIA_NAME, "criteria": sorted({c.name for c in criteria.values()}),
                                    "layers": list(criteria)}
    sweep_md = sweep_png = None
    if runs:
        sweep_md = _sweep_markdown(runs)
        sweep_png = _write_sweep(runs, out)
        meta["sweep"] = {"runs": [r.run_name for r in runs], "files": sorted(
            p.name for p in out.iterdir() if p.name.startswith(SWEEP_PREFIX + "."))}
    write_json(out / TDROP_CONFIG_NAME, meta)
    card = _model_card(model, meta, base_model=base_model, repo_id=repo_id, sparsity_md=report.to_markdown(),
                       shrink_md=shrink_report.to_markdown() if shrink_report is not None else None,
                       sweep_md=sweep_md, sweep_png=sweep_png)
    card.save(out / MODEL_CARD_NAME)
    return out


def _write_sweep(runs: list, out: Path) -> Optional[str]:
    """Write ``sweep.md/.csv/.json`` (+ ``.png`` if matplotlib works); returns the PNG name or None."""

    if len(runs) == 1:
        try:
            paths = runs[0].save(out, prefix=SWEEP_PREFIX)
        except ImportError:
            paths = runs[0].save(out, prefix=SWEEP_PREFIX, plot=False)
        return paths["png"].name if "png" in paths else None
    (out / f"{SWEEP_PREFIX}.md").write_text(_sweep_markdown(runs), encoding="utf-8")
    write_json(out / f"{SWEEP_PREFIX}.json", [r.to_dict() for r in runs])
    try:
        return plot_sweeps(runs, out / f"{SWEEP_PREFIX}.png").name
    except ImportError:
        return None


def push_pruned_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: str = "Upload model pruned with hf-tdrop",
    revision: Optional[str] = None,
    create_pr: bool = False,
    **save_kwargs,
):
    """Save like :func:`save_pruned` (into a temporary directory) and upload it to the Hub repo ``repo_id``.

    Args:
        model: as in :func:`save_pruned`.
        repo_id: ``"namespace/name"`` (or ``"name"``); created if missing (``exist_ok``).
        private: create the repo as private (an existing repo's visibility is not changed).
        token: Hub token; default: the usual places (``HF_TOKEN``, the ``hf auth login`` cache). It is
            passed to ``huggingface_hub`` only: never printed, logged or written into the uploaded files.
        commit_message, revision, create_pr: as in ``HfApi.upload_folder``.
        **save_kwargs: ``tokenizer_or_processor``, ``sweep``, ``prune_report``, ``shrink_report``,
            ``sparsity``, ``mode``, ``method``, ``n``, ``m``, ``training_config``, ``schedule``, ``base_model``.

    Returns:
        The ``CommitInfo`` of the upload (``.commit_url``, ``.oid``; ``.pr_url`` with ``create_pr``).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"`repo_id` must be a non-empty string like 'user/name', got {repo_id!r}.")
    validate_repo_id(repo_id)  # HFValidationError is a ValueError
    for flag, value in (("private", private), ("create_pr", create_pr)):
        if not isinstance(value, bool):
            raise ValueError(f"`{flag}` must be True or False, got {value!r}.")
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("`token` must be None or a non-empty string.")
    for forbidden in ("output_dir", "overwrite"):
        if forbidden in save_kwargs:
            raise ValueError(f"push_pruned_to_hub does not take `{forbidden}` (it saves to a temporary directory).")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf_tdrop_push_") as tmp:
        _save_pruned(model, tmp, repo_id=repo_id, **save_kwargs)
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                                 commit_message=commit_message, revision=revision, create_pr=create_pr)
    logger.info("Uploaded to https://huggingface.co/%s", repo_id)
    return info
