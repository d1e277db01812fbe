"""``hf-tdrop`` command line: prune (and shrink) a checkpoint, save / publish it, report its sparsity.

Examples::

    hf-tdrop prune ./my-td-bert --sparsity 0.5 --mode unit --shrink --output ./bert-unit50
    hf-tdrop prune ./my-td-bert --sparsity 0.8 --output ./bert-w80 --push-to-hub me/bert-w80 --private
    hf-tdrop prune ./my-td-bert --mode nm --n 2 --m 4 --output ./bert-2of4
    hf-tdrop report ./bert-unit50 --format markdown

The model is loaded with ``AutoConfig`` and the Auto class whose mapping holds the config's
``architectures[0]`` (e.g. ``AutoModelForSequenceClassification`` for ``BertForSequenceClassification``),
falling back to ``AutoModel``. Without ``--target-modules``, ``prune`` prunes the layers the model
was trained with, as recorded in its ``tdrop_training_config.json``. Every argument is checked
before anything is written; a bad argument exits with status 2 and a one-line reason, a failure
while running with status 1.

This module imports only the standard library at import time: torch, transformers and the rest
of hf_tdrop are loaded after the arguments are parsed and checked, so ``--help`` and argument
errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger("hf_tdrop.cli")

PROG = "hf-tdrop"
REPORT_FORMATS = ("text", "markdown", "json")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "preprocessor_config.json", "processor_config.json")


class UsageError(Exception):
    """A bad command-line argument (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``hf-tdrop prune: error: <reason> (see --help)``."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Targeted Dropout (Gomez et al., 2019) tools: prune a transformers checkpoint by magnitude "
                    "(optionally shrink unit-pruned feed-forward blocks into a smaller dense model), save or "
                    "publish it with tdrop_config.json and a model card, and report sparsity.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{prune,report}", parser_class=_Parser)
    sub.required = True

    prune = sub.add_parser(
        "prune", help="prune a checkpoint, optionally shrink it, and save and/or push it",
        description="Load MODEL (a local checkpoint directory or a Hub id), prune every targeted layer to the "
                    "same sparsity, optionally shrink dead feed-forward units (unit mode), and save it with "
                    "save_pretrained (safetensors), tdrop_config.json and a model card.",
    )
    prune.add_argument("model", metavar="MODEL_DIR_OR_ID", help="checkpoint directory (with config.json) or Hub model id")
    prune.add_argument("--sparsity", type=_fraction, default=None,
                       help="fraction to prune in every targeted layer, in [0, 1): of each w_o's weights "
                            "(weight mode) or of each layer's units (unit mode); required in those modes. "
                            "nm mode: fraction in [0, 1] of each w_o's groups pruned to N:M (default 1: all)")
    prune.add_argument("--mode", choices=("weight", "unit", "nm"), default="weight",
                       help="prune individual weights within each output unit, whole units, or to an N:M "
                            "pattern (each group of M consecutive inputs keeps its N largest |w|) (default: weight)")
    prune.add_argument("--n", type=_positive_int, default=None,
                       help="nm mode: nonzeros kept per group (default 2)")
    prune.add_argument("--m", type=_positive_int, default=None,
                       help="nm mode: group size, consecutive inputs of each w_o (default 4)")
    prune.add_argument("--method", choices=("magnitude", "random", "gates", "log_alpha"), default="magnitude",
                       help="smallest |w| / ||w_o||_2 first (the paper's criterion), random, or a learned criterion "
                            "(gates: L0 log alpha; log_alpha: variational dropout), read from MODEL's "
                            "tdrop_criteria.safetensors (written by save_pruned / save_learned_criteria) or from "
                            "a checkpoint saved while still patched, with its tdrop_training_config.json "
                            "(default: magnitude)")
    prune.add_argument("--target-modules", nargs="+", metavar="PATTERN", default=None,
                       help="layers to prune: full names, dotted suffixes (e.g. 'intermediate.dense') or regexes "
                            "(default: the layers MODEL was trained with, as its tdrop_training_config.json "
                            "records them; without one, every Linear/Conv1D/Conv layer except output heads and "
                            "tied layers)")
    prune.add_argument("--exclude-modules", nargs="+", metavar="PATTERN", default=None,
                       help="layers never to prune (same pattern rules; added to the recorded exclusions)")
    prune.add_argument("--seed", type=_seed, default=0, help="seed of --method random (default: 0)")
    prune.add_argument("--shrink", action="store_true",
                       help="after unit pruning, physically remove dead feed-forward units (needs --mode unit; "
                            "BERT, RoBERTa, ViT, GPT-2, T5, Marian, BART, Llama, Mistral, Qwen2)")
    prune.add_argument("--on-uneven", choices=("pad", "raise"), default="pad",
                       help="with --shrink, when layers would get different widths: keep the widest (pad) or "
                            "fail (raise) (default: pad)")
    prune.add_argument("--output", metavar="DIR", default=None,
                       help="directory to write (must be empty or absent unless --overwrite)")
    prune.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --output directory")
    prune.add_argument("--push-to-hub", metavar="REPO", default=None,
                       help="also upload to this Hub repo ('user/name'); token from HF_TOKEN or `hf auth login`")
    prune.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")
    prune.add_argument("--base-model", metavar="HUB_ID", default=None,
                       help="base_model for the model card (default: MODEL when it is a Hub id)")

    report = sub.add_parser(
        "report", help="print the sparsity of a checkpoint's layers",
        description="Load MODEL and print, per supported layer, the fraction of zero weights and all-zero units.",
    )
    report.add_argument("model", metavar="MODEL_DIR", help="checkpoint directory (with config.json) or Hub model id")
    report.add_argument("--format", choices=REPORT_FORMATS, default="text", help="output format (default: text)")
    report.add_argument("--target-modules", nargs="+", metavar="PATTERN", default=None,
                        help="only these layers (default: every supported layer, heads included and flagged)")
    report.add_argument("--exclude-modules", nargs="+", metavar="PATTERN", default=None,
                        help="leave these layers out")
    return parser


# --------------------------------------------------------------------------------------------------


def _looks_like_path(model: str) -> bool:
    """A MODEL meant as a local path: starts with ``.``, ``~`` or a separator, has a backslash or
    more than one ``/``, or its first component is an existing directory (``runs/model``)."""
    if model.startswith((".", "~", "/")) or "\\" in model or model.count("/") > 1:
        return True
    return "/" in model and Path(model.split("/", 1)[0]).is_dir()


def _check_model_arg(model: str) -> bool:
    """Validate MODEL; returns True if it is a local directory. A path that does not exist is a
    usage error at once; a Hub id is looked up with one request (no retries), so a typo or an
    unreachable Hub is one line, not a minute of retries."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"MODEL {model!r} is a file; give a checkpoint directory or a Hub id")
        if not (path / "config.json").is_file():
            raise UsageError(f"MODEL directory {model!r} has no config.json (not a transformers checkpoint)")
        return True
    if _looks_like_path(model):
        raise UsageError(f"MODEL {model!r}: no such directory")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except ValueError:
        raise UsageError(f"MODEL {model!r} is neither an existing directory nor a valid Hub model id") from None
    _check_hub_model(model)
    return False


def _check_hub_model(model: str) -> None:
    """One lookup of a Hub model id that is not a local directory (skipped when it is cached)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(f"MODEL {model!r} is not a local directory, and HF_HUB_OFFLINE is set: it cannot be "
                           "fetched from the Hub (check the path, or unset HF_HUB_OFFLINE)")
    try:
        HfApi().model_info(model, timeout=10)
    except GatedRepoError:
        return  # exists; loading says what access it needs
    except RepositoryNotFoundError:
        raise UsageError(f"MODEL {model!r} is neither a local directory nor a model on the Hub "
                         "(a private model needs `hf auth login`)") from None
    except Exception as err:  # noqa: BLE001 - connection errors of any HTTP stack, reported as one line
        raise RuntimeError(f"MODEL {model!r} is not a local directory, and the Hub could not be reached to look it "
                           f"up ({_one_line(err)})") from None


def _load_config(model: str):
    from transformers import AutoConfig

    from . import models  # noqa: F401 - registers tdrop_cifar_resnet / tdrop_mlp with the Auto classes

    try:
        return AutoConfig.from_pretrained(model)
    except Exception as err:  # noqa: BLE001 - reported as one line
        raise RuntimeError(f"could not load the config of {model!r}: {_one_line(err)}") from None


def _load_model(model: str, config):
    from .hub import auto_class_for

    auto_cls = auto_class_for(config)
    logger.info("Loading %s with %s", model, auto_cls.__name__)
    try:
        return auto_cls.from_pretrained(model, config=config)
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(f"could not load {model!r} with {auto_cls.__name__}: {_one_line(err)}") from None


def _load_preprocessor(model: str, is_local: bool):
    if is_local and not any((Path(model) / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoProcessor, AutoTokenizer

    for loader in (AutoProcessor, AutoTokenizer):
        try:
            return loader.from_pretrained(model)
        except Exception:  # noqa: BLE001 - optional: the model is saved without it
            continue
    logger.warning("No tokenizer or processor could be loaded from %s; saving the model without one.", model)
    return None


def _training_config_from(model: str, is_local: bool):
    """``(config, file name)``: the training config saved with a local model (its
    ``tdrop_training_config.json``, or the one recorded in a ``tdrop_config.json`` that
    ``save_pruned`` wrote) -- a :class:`TargetedDropoutConfig` or another method's config -- or
    ``(None, None)``."""
    if not is_local:
        return None, None
    from .config import read_config_file
    from .methods.base import config_from_dict

    try:
        data, path = read_config_file(Path(model))
        return config_from_dict(data), path.name
    except FileNotFoundError:
        return None, None
    except (TypeError, ValueError) as err:
        logger.warning("Not recording a training config (nor taking pruning targets from it): %s", _one_line(err))
        return None, None


def _merge_patterns(*specs) -> Optional[list[str]]:
    from .config import check_target_spec

    merged = [p for spec in specs for p in (check_target_spec("exclude_modules", spec) or ())]
    return list(dict.fromkeys(merged)) or None


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def _method_tensors(model_dir: Path) -> dict:
    """``{method name: {state_dict key: tensor}}`` of the training-method tensors (L0 ``log α``,
    variational ``log σ²``, ...) in a checkpoint saved while the model was still patched."""
    from safetensors import safe_open

    from .methods.base import registered_handlers

    suffixes = {f".{t}": name for name, handler in registered_handlers().items() for t in handler.extra_tensors}
    found: dict = {}
    for file in _weight_files(model_dir):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                method = next((m for suffix, m in suffixes.items() if key.endswith(suffix)), None)
                if method is not None:
                    found.setdefault(method, {})[key] = handle.get_tensor(key)
    return found


def _restore_method(model, model_dir: Path, training_config, required: bool) -> Optional[str]:
    """For a checkpoint saved while patched with a training method (its weights hold the method's
    tensors) and whose ``tdrop_training_config.json`` records that method's config: patch the model
    with it, load the tensors and ``finalize_model`` it, so it computes what the trained model
    computed and its layers carry the learned scores. Returns the method's name, or None when the
    checkpoint holds no such tensors. When the config to restore them is missing: ``UsageError`` if
    ``required`` (a learned ``--method``), else a warning (the raw weights are pruned as they are)."""
    from .constants import METHOD_ATTR
    from .methods.base import MethodConfig, method_layers
    from .patching import finalize_model, patch_model

    found = _method_tensors(model_dir)
    if not found:
        return None
    method, tensors = next(iter(found.items()))
    if len(found) > 1:
        raise RuntimeError(f"MODEL's weights hold the tensors of several training methods ({sorted(found)}); "
                           "cannot tell which one the model was trained with.")
    if not isinstance(training_config, MethodConfig) or training_config.method != method:
        example = next(iter(tensors)).rsplit(".", 1)[-1]
        if not required:
            logger.warning("MODEL's weights hold the %r tensors of the %r training method, but no "
                           "tdrop_training_config.json records its settings: pruning the weights as they are, "
                           "without the method's effect folded in.", example, method)
            return None
        raise UsageError(
            f"MODEL's weights hold the {example!r} tensors of the {method!r} training method, but no "
            f"tdrop_training_config.json in it records that method's settings; write the config the model was "
            f"trained with, e.g. `python -c \"import hf_tdrop; hf_tdrop.method_config('{method}', ...)"
            f".save_pretrained('{model_dir}')\"`, and run this command again")
    patch_model(model, config=training_config)
    state_keys = set(model.state_dict())
    wanted = sorted(key for name, layer in method_layers(model) for t in getattr(layer, METHOD_ATTR).handler.extra_tensors
                    if (key := f"{name}.{t}" if name else t) in state_keys)
    missing = [k for k in wanted if k not in tensors]
    unexpected = sorted(set(tensors) - set(wanted))
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}, which the recorded config does not patch"
        raise RuntimeError(f"MODEL's {method} tensors do not fit its tdrop_training_config.json: the checkpoint {what}.")
    model.load_state_dict(tensors, strict=False)
    finalize_model(model)
    logger.info("Restored the %s training state of %d layers from MODEL's weights and folded it in "
                "(finalize_model).", method, len(wanted))
    return method


def _criteria_dir(model: str, is_local: bool) -> Optional[Path]:
    """The directory holding MODEL's learned-scores sidecar, or None (a Hub id: downloaded if it has one)."""
    from .constants import CRITERIA_NAME
    from .criteria import criteria_file

    if is_local:
        return Path(model) if criteria_file(model) is not None else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, CRITERIA_NAME)).parent
    except Exception:  # noqa: BLE001 - no sidecar on the Hub, or the Hub is unreachable
        return None


def _require_learned_scores(model, args, is_local: bool, restored: Optional[str]) -> None:
    """Make sure the layers carry the learned scores ``--method`` needs: restored from a patched
    checkpoint, or read from the sidecar; else a one-line usage error saying what to run."""
    from .constants import CRITERIA_NAME, CRITERION_ATTR
    from .criteria import load_learned_criteria
    from .methods.base import learned_criteria

    if restored is None:
        directory = _criteria_dir(args.model, is_local)
        if directory is not None:
            loaded = load_learned_criteria(model, directory)
            logger.info("Read the learned scores of %d layers from %s.", len(loaded), directory)
    if any(getattr(m.__dict__.get(CRITERION_ATTR), "name", None) == args.method for m in model.modules()):
        return
    method = learned_criteria()[args.method]
    raise UsageError(
        f"--method {args.method} needs the learned {method} scores, and MODEL carries none: it has no "
        f"{CRITERIA_NAME} and its weights hold no {method} tensors. A finalised model keeps them in memory only: "
        f"save them beside its weights from Python with `hf_tdrop.save_learned_criteria(model, '{args.model}')` "
        f"(hf_tdrop.save_pruned writes them too) and run this command again, or prune with --method magnitude")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _check_prune_numbers(sparsity, mode: str, n, m):
    """``(sparsity, n, m)`` of ``hf-tdrop prune``, checked as ``prune_model`` checks them, without
    importing torch; nm mode's defaults filled in (sparsity 1, 2:4)."""
    import math

    from .config import check_fraction, check_nm

    if mode != "nm" and (n is not None or m is not None):
        raise UsageError("--n/--m set the N:M pattern of --mode nm")
    if mode != "nm" and sparsity is None:
        raise UsageError(f"--sparsity is required with --mode {mode} (a fraction in [0, 1))")
    try:
        if mode == "nm":
            n, m = check_nm(2 if n is None else n, 4 if m is None else m)
            sparsity = 1.0 if sparsity is None else check_fraction(
                "sparsity", sparsity, meaning="fraction of groups pruned to N:M in mode 'nm'")
            return sparsity, n, m
    except ValueError as err:
        message = str(err).replace("`n`", "--n").replace("`m`", "--m").replace("`sparsity`", "--sparsity")
        raise UsageError(message.rstrip(".")) from None
    if math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
        raise UsageError(f"--sparsity must be in [0, 1), got {sparsity!r}")
    return sparsity, None, None


def _run_prune(args) -> int:
    from ._utils import check_output_dir

    # ---- validate everything before loading or writing anything (no torch import yet) -------
    args.sparsity, args.n, args.m = _check_prune_numbers(args.sparsity, args.mode, args.n, args.m)
    if args.shrink and args.mode != "unit":
        raise UsageError("--shrink needs --mode unit (only whole dead units can be removed)")
    if args.output is None and args.push_to_hub is None:
        raise UsageError("give --output DIR and/or --push-to-hub REPO")
    if args.private and args.push_to_hub is None:
        raise UsageError("--private only applies with --push-to-hub")
    if args.overwrite and args.output is None:
        raise UsageError("--overwrite only applies with --output")
    if args.output is not None:
        try:
            check_output_dir(args.output, args.overwrite)
        except ValueError as err:
            raise UsageError(str(err).replace("overwrite=True (CLI: --overwrite)", "--overwrite")) from None
    from huggingface_hub.utils import validate_repo_id

    for flag, value in (("--push-to-hub", args.push_to_hub), ("--base-model", args.base_model)):
        if value is not None:
            try:
                validate_repo_id(value)
            except ValueError:
                raise UsageError(f"{flag} {value!r} is not a valid Hub repo id ('user/name')") from None
    is_local = _check_model_arg(args.model)
    from .config import check_target_spec

    for flag, value in (("--target-modules", args.target_modules), ("--exclude-modules", args.exclude_modules)):
        try:
            check_target_spec(flag, value)
        except ValueError as err:
            raise UsageError(str(err)) from None

    config = _load_config(args.model)
    if args.shrink:
        from .shrink import SUPPORTED_MODEL_TYPES

        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UsageError(f"--shrink does not support model type {config.model_type!r}; "
                             f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}")

    # ---- load, prune, shrink (in memory) ------------------------------------------------------
    import torch

    from .hub import push_pruned_to_hub, save_pruned
    from .pruning import METHODS, prune_model
    from .shrink import shrink_model

    model = _load_model(args.model, config)
    model.eval()
    preprocessor = _load_preprocessor(args.model, is_local)
    training_config, config_file = _training_config_from(args.model, is_local)
    restored = (_restore_method(model, Path(args.model), training_config, required=args.method not in METHODS)
                if is_local else None)
    if args.method not in METHODS:
        _require_learned_scores(model, args, is_local, restored)
    # targets: --target-modules, else those recorded with the training config, else prune_model's default
    target_modules, exclude_modules, source = args.target_modules, args.exclude_modules, None
    if target_modules is None and training_config is not None:
        target_modules = training_config.target_modules
        exclude_modules = _merge_patterns(training_config.exclude_modules, args.exclude_modules)
        source = config_file
    generator = torch.Generator().manual_seed(args.seed) if args.method == "random" else None
    try:
        prune_report = prune_model(model, args.sparsity, mode=args.mode, method=args.method, n=args.n, m=args.m,
                                   target_modules=target_modules, exclude_modules=exclude_modules,
                                   generator=generator)
    except ValueError as err:
        where = f" (targets recorded in MODEL's {source})" if source else ""
        raise UsageError(_one_line(err) + where) from None
    if source is not None:
        prune_report.target_source = source
    what = (f"{args.method} {args.n}:{args.m} pruning of {args.sparsity:g} of the groups" if args.mode == "nm"
            else f"{args.method} {args.mode} pruning at sparsity {args.sparsity:g}")
    print(f"Pruned {prune_report.pruned_fraction:.2%} of the weights of {len(prune_report.layers)} layers ({what}).")
    print(f"Targets: {prune_report.describe_targets()}.")
    shrink_report = None
    if args.shrink:
        shrink_report = shrink_model(model, on_uneven=args.on_uneven)
        print(str(shrink_report))

    # ---- write ------------------------------------------------------------------------------------
    base_model = args.base_model or (None if is_local else args.model)
    save_kwargs = dict(tokenizer_or_processor=preprocessor, prune_report=prune_report, shrink_report=shrink_report,
                       base_model=base_model, training_config=training_config)
    if args.output is not None:
        out = save_pruned(model, args.output, overwrite=args.overwrite, **save_kwargs)
        print(f"Saved to {out}")
    if args.push_to_hub is not None:
        info = push_pruned_to_hub(model, args.push_to_hub, private=args.private, **save_kwargs)
        print(f"Uploaded to {getattr(info, 'commit_url', None) or args.push_to_hub}")
    return 0


def _run_report(args) -> int:
    from .config import check_target_spec
    from .reports import sparsity_report

    for flag, value in (("--target-modules", args.target_modules), ("--exclude-modules", args.exclude_modules)):
        try:
            check_target_spec(flag, value)
        except ValueError as err:
            raise UsageError(str(err)) from None
    _check_model_arg(args.model)
    config = _load_config(args.model)
    model = _load_model(args.model, config)
    try:
        report = sparsity_report(model, args.target_modules, args.exclude_modules)
    except ValueError as err:
        raise UsageError(_one_line(err)) from None
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=2))
    elif args.format == "markdown":
        print(report.to_markdown())
    else:
        t = report.total
        print(f"{args.model} ({config.model_type}, {type(model).__name__}): {t['n_layers']} supported layers, "
              f"{t['weight_sparsity']:.2%} zero weights ({t['zero_weights']}/{t['n_weights']}), "
              f"{t['unit_sparsity']:.2%} all-zero units ({t['zero_units']}/{t['n_units']})")
        print(str(report))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``hf-tdrop`` console script; returns the exit status (0 ok, 2 bad argument, 1 failure)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a parse error (2, message already printed)
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run = _run_prune if args.command == "prune" else _run_report
    try:
        return run(args)
    except UsageError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, OSError) as err:
        print(f"{PROG} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
