"""Run specs: the short strings the example scripts take for "train this model with that method".

One grammar for ``image_classification.py --runs`` (a comma-separated list, one column of the tables
per spec) and ``wmt_en_de.py --method`` (one spec). Each spec is parsed into a :class:`RunSpec`,
whose :meth:`RunSpec.config` builds the method's config through the library's registry
(:func:`hf_tdrop.method_config`), so every setting is validated by the config class itself.

Parsing imports neither ``hf_tdrop`` nor torch (the scripts parse their flags before the heavy
imports): the numbers of a spec are checked here against the same ranges as the config classes
check, and the column label is the one the config's ``run_label`` gives (a test holds both to the
library's). ``hf_tdrop`` is imported by :meth:`RunSpec.config` and :meth:`RunSpec.to_dict`.

Grammar (``MODE`` is ``weight`` or ``unit``; numbers in any float spelling; ``LABEL=SPEC`` renames
the column)::

    none                                no method (the baseline)
    MODE:ALPHA:GAMMA[:SCHEDULE]         targeted dropout; SCHEDULE is constant|linear|cosine|piecewise,
                                        or ramp (the script's --schedule if it ramps, else piecewise);
                                        default: the script's --schedule
    random:MODE:ALPHA:GAMMA[:SCHEDULE]  the random-target control (fixed random targeted set)
    dropout:MODE:RATE                   untargeted weight / unit dropout
    l1:LAMBDA                           L1 penalty λ·Σ mean|W|
    l0:MODE:LAMBDA                      L0 hard-concrete gates per weight / per unit, cost λ
    vd[:KL_SCALE[:WARMUP]]              sparse variational dropout (also variational:...);
                                        WARMUP = KL warm-up as a fraction of the training updates
    smallify:LAMBDA                     Smallify switches, switch L1 λ
    randinit:MODE:SPARSITY              random pruning before training: a random SPARSITY fraction
                                        pruned at initialisation and held at zero throughout training
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

MODES = ("weight", "unit")
SCHEDULE_KINDS = ("constant", "linear", "cosine", "piecewise")
"""``hf_tdrop.SCHEDULE_KINDS``, spelled out so that parsing imports no torch (a test checks they are equal)."""
GRAMMAR = ("none | MODE:ALPHA:GAMMA[:SCHEDULE] | random:MODE:ALPHA:GAMMA[:SCHEDULE] | dropout:MODE:RATE | "
           "l1:LAMBDA | l0:MODE:LAMBDA | vd[:KL_SCALE[:WARMUP]] | smallify:LAMBDA | randinit:MODE:SPARSITY, "
           f"each optionally LABEL=SPEC; MODE {'|'.join(MODES)}, SCHEDULE {'|'.join(SCHEDULE_KINDS)}|ramp")
"""What a spec may be, in one line (used in every error message)."""

KINDS = ("none", "targeted_dropout", "method", "randinit")
"""``none``: plain training; ``targeted_dropout``: targeted dropout or the random-target control
(α/γ driven by a schedule); ``method``: a registered method with its own layer behaviour / loss;
``randinit``: random pruning at initialisation, held at zero."""

ALIASES = {"random": "random_target", "random_target": "random_target", "dropout": "dropout", "l1": "l1",
           "l0": "l0", "vd": "variational_dropout", "variational": "variational_dropout",
           "variational_dropout": "variational_dropout", "smallify": "smallify", "randinit": "randinit"}


class RunSpecError(ValueError):
    """A spec that does not parse; its message names the spec, the reason and the grammar."""


@dataclass
class RunSpec:
    """One parsed spec (one column of the tables).

    Attributes:
        spec: the text as given (without the label).
        name: directory-safe run name, unique per spec.
        label: column label (``LABEL=`` or the config's :meth:`run_label`).
        kind: one of :data:`KINDS`.
        method: registry name (``targeted_dropout``, ``random_target``, ``l0``, ...) or None.
        settings: keyword settings of the method's config (``dataset_size`` is filled in at training).
        mode: ``weight`` / ``unit`` for targeted dropout, random-target, dropout, L0 and randinit.
        alpha, gamma: targeted dropout / random-target targets.
        schedule: their α/γ schedule kind (None for the other kinds).
        schedule_given: the spec names its schedule (then the name and label show it).
        sparsity: randinit's pruned fraction.
        kl_warmup_fraction: variational dropout's KL warm-up as a fraction of the training updates.
    """

    spec: str
    name: str
    label: str
    kind: str = "none"
    method: Optional[str] = None
    settings: dict = field(default_factory=dict)
    mode: Optional[str] = None
    alpha: float = 0.0
    gamma: float = 0.0
    schedule: Optional[str] = None
    sparsity: Optional[float] = None
    kl_warmup_fraction: float = 0.0
    schedule_given: bool = False

    @property
    def ramped(self) -> bool:
        return self.kind == "targeted_dropout" and self.schedule not in (None, "constant")

    @property
    def has_targeting(self) -> bool:
        """Targeted dropout or the random-target control (α/γ set by a schedule callback)."""
        return self.kind == "targeted_dropout"

    def config(self, dataset_size: Optional[int] = None, total_updates: Optional[int] = None, **common) -> Any:
        """The method's config, built through the registry (None for ``none`` and ``randinit``).

        Args:
            dataset_size: training-set size (L0 and variational dropout divide their cost by it).
            total_updates: optimizer updates of the run (for the KL warm-up fraction).
            common: ``target_modules`` / ``exclude_modules``.
        """
        if self.method is None:
            return None
        import hf_tdrop  # torch: only once a run is built

        settings = dict(self.settings)
        if "dataset_size" in {f.name for f in dataclasses.fields(config_class(self.method))}:
            settings["dataset_size"] = dataset_size or 1
        if self.kl_warmup_fraction and total_updates:
            settings["kl_warmup_steps"] = max(1, round(self.kl_warmup_fraction * total_updates))
        return hf_tdrop.method_config(self.method, **settings, **{k: v for k, v in common.items() if v is not None})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        config = self.config()
        out["config"] = None if config is None else config_dict(config)
        return out


def config_class(method: str) -> type:
    """The config class of a registered method, found among the library's public ``*Config`` classes."""
    import hf_tdrop

    for name in hf_tdrop.__all__:
        cls = getattr(hf_tdrop, name) if name.endswith("Config") else None
        if isinstance(cls, type) and cls is not hf_tdrop.MethodConfig and getattr(cls, "method", None) == method:
            return cls
    raise ValueError(f"no config class for method {method!r}")


def config_dict(config) -> dict:
    """The config as a JSON-friendly dict that :func:`hf_tdrop.config_from_dict` reads back."""
    data = config.to_dict()
    data.setdefault("method", "targeted_dropout")
    return data


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RunSpecError(f"bad run spec {spec!r}: {what} must be a number, got {text!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise RunSpecError(f"bad run spec {spec!r}: {what} must be a finite number, got {text!r}")
    return value


def _mode(text: str, spec: str) -> str:
    if text not in MODES:
        raise RunSpecError(f"bad run spec {spec!r}: MODE must be one of {'|'.join(MODES)}, got {text!r}")
    return text


def _schedule(parts: list[str], spec: str, default: str, ramp_default: str) -> str:
    if not parts:
        return default
    kind = parts[0]
    if kind == "ramp":
        return ramp_default
    if kind not in SCHEDULE_KINDS:
        raise RunSpecError(f"bad run spec {spec!r}: SCHEDULE must be one of {'|'.join(SCHEDULE_KINDS)}|ramp, "
                           f"got {kind!r}")
    return kind


SIMPLE_METHODS = {
    # registry method (also the spec head): (name of the number in messages, its setting, whether a MODE comes first)
    "dropout": ("RATE", "rate", True),
    "l1": ("LAMBDA", "l1", False),
    "l0": ("LAMBDA", "l0", True),
    "smallify": ("LAMBDA", "l1", False),
}


def _in_range(setting: str, value: float, low: float = -math.inf, high: float = math.inf,
              low_open: bool = False, high_open: bool = False) -> None:
    """The config classes' range check of one setting, with their message (``check_number``)."""
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        raise ValueError(f"`{setting}` must be in {'(' if low_open else '['}{low:g}, {high:g}"
                         f"{')' if high_open else ']'}, got {value!r}.")


RANGES = {
    # method: {setting: the range its config class accepts}; checked at parsing, and again by the
    # config class when the run is built (a test holds them to the library's)
    "targeted_dropout": {"alpha": dict(low=0.0, high=1.0), "gamma": dict(low=0.0, high=1.0)},
    "random_target": {"alpha": dict(low=0.0, high=1.0), "gamma": dict(low=0.0, high=1.0)},
    "dropout": {"rate": dict(low=0.0, high=1.0, high_open=True)},
    "l1": {"l1": dict(low=0.0, low_open=True)},
    "l0": {"l0": dict(low=0.0, low_open=True)},
    "smallify": {"l1": dict(low=0.0)},
    "variational_dropout": {"kl_scale": dict(low=0.0)},
}

LABELS = {
    # method: its config's ``run_label()`` (a test holds them to the library's)
    "random_target": "random-target {mode} α={alpha:g} γ={gamma:g}",
    "dropout": "dropout {mode} {rate:g}",
    "l1": "L1 λ={l1:g}",
    "l0": "L0 {mode} λ={l0:g}",
    "smallify": "Smallify λ={l1:g}",
    "variational_dropout": "variational dropout ×{kl_scale:g}",
}


def check_settings(method: str, settings: dict) -> None:
    """Raise ``ValueError`` (the config class's message) for a setting out of its range."""
    for setting, bounds in RANGES.get(method, {}).items():
        if setting in settings:
            _in_range(setting, settings[setting], **bounds)


def _arity(parts: list[str], low: int, high: int, form: str, spec: str) -> None:
    if not low <= len(parts) <= high:
        raise RunSpecError(f"bad run spec {spec!r}: expected {form}")


def parse_run_spec(text: str, default_schedule: str = "constant") -> RunSpec:
    """Parse one spec (see the module docstring); raises :class:`RunSpecError` with a one-line message.

    Args:
        text: e.g. ``"l0:unit:1e-3"`` or ``"ramped=weight:0.99:0.99:ramp"``.
        default_schedule: the schedule of targeted-dropout specs that name none (``ramp`` means this
            one when it is not ``constant``, else ``piecewise``).
    """
    original = text.strip()
    label = None
    if "=" in original:
        label, original = (x.strip() for x in original.split("=", 1))
        if not label:
            raise RunSpecError(f"bad run spec {text.strip()!r}: empty LABEL before '='")
    spec = original
    parts = [p.strip() for p in spec.split(":")] if spec else [""]
    head = parts[0].lower()
    ramp_default = default_schedule if default_schedule != "constant" else "piecewise"
    try:
        if head == "none":
            _arity(parts, 1, 1, "'none'", spec)
            run = RunSpec(spec, "none", "none")
        elif head in MODES or head in ("random", "random_target"):
            targeted = head in MODES
            body = parts if targeted else parts[1:]
            form = "MODE:ALPHA:GAMMA[:SCHEDULE]" if targeted else "random:MODE:ALPHA:GAMMA[:SCHEDULE]"
            _arity(body, 3, 4, form, spec)
            mode = _mode(body[0], spec)
            alpha, gamma = _number(body[1], "ALPHA", spec), _number(body[2], "GAMMA", spec)
            schedule = _schedule(body[3:], spec, default_schedule, ramp_default)
            method = "targeted_dropout" if targeted else "random_target"
            name = f"{'' if targeted else 'random-'}{mode}-a{alpha:g}-g{gamma:g}"
            if len(body) == 4:
                name += f"-{schedule}"
            run = RunSpec(spec, name, "", kind="targeted_dropout", method=method,
                          settings=dict(alpha=alpha, gamma=gamma, mode=mode), mode=mode, alpha=alpha,
                          gamma=gamma, schedule=schedule, schedule_given=len(body) == 4)
        elif head in SIMPLE_METHODS:
            # NAME[:MODE]:NUMBER -> one method setting (and the mode, where the method has one)
            number_name, setting, with_mode = SIMPLE_METHODS[head]
            form = f"{head}:MODE:{number_name}" if with_mode else f"{head}:{number_name}"
            n_parts = 3 if with_mode else 2
            _arity(parts, n_parts, n_parts, form, spec)
            mode = _mode(parts[1], spec) if with_mode else None
            value = _number(parts[-1], number_name, spec)
            settings = {setting: value} if mode is None else {setting: value, "mode": mode}
            name = f"{head}-{mode}-{value:g}" if with_mode else f"{head}-{value:g}"
            run = RunSpec(spec, name, "", kind="method", method=head, settings=settings, mode=mode)
        elif head in ("vd", "variational", "variational_dropout"):
            _arity(parts, 1, 3, "vd[:KL_SCALE[:WARMUP]]", spec)
            scale = _number(parts[1], "KL_SCALE", spec) if len(parts) > 1 else 1.0
            warmup = _number(parts[2], "WARMUP", spec) if len(parts) > 2 else 0.0
            if not 0.0 <= warmup <= 1.0:
                raise RunSpecError(f"bad run spec {spec!r}: WARMUP is a fraction of the training updates in [0, 1], "
                                   f"got {warmup:g}")
            name = f"vd-{scale:g}" + (f"-w{warmup:g}" if warmup else "")
            run = RunSpec(spec, name, "", kind="method", method="variational_dropout",
                          settings=dict(kl_scale=scale), kl_warmup_fraction=warmup)
        elif head == "randinit":
            _arity(parts, 3, 3, "randinit:MODE:SPARSITY", spec)
            mode, sparsity = _mode(parts[1], spec), _number(parts[2], "SPARSITY", spec)
            if not 0.0 < sparsity < 1.0:
                raise RunSpecError(f"bad run spec {spec!r}: SPARSITY must be in (0, 1), got {sparsity:g}")
            run = RunSpec(spec, f"randinit-{mode}-{sparsity:g}", "", kind="randinit", mode=mode, sparsity=sparsity)
        else:
            raise RunSpecError(f"bad run spec {spec!r}: unknown method {parts[0]!r}")
        check_settings(run.method, run.settings)  # the config class's ranges, without importing it
    except RunSpecError as err:
        raise RunSpecError(f"{err}; allowed: {GRAMMAR}") from None
    except ValueError as err:  # the config class's own check, e.g. `rate` must be in [0, 1)
        raise RunSpecError(f"bad run spec {spec!r}: {str(err).rstrip('.')}; allowed: {GRAMMAR}") from None
    run.label = label or default_label(run)
    return run


def default_label(run: RunSpec) -> str:
    if run.kind == "none":
        return "none"
    if run.kind == "randinit":
        return f"random pruning before training, {run.mode} {run.sparsity:.0%}"
    if run.method == "targeted_dropout":
        label = f"{run.mode} TD α={run.alpha:g} γ={run.gamma:g}"
    else:
        label = LABELS[run.method].format(**run.settings)
        if run.kl_warmup_fraction:
            label += f", KL warm-up {run.kl_warmup_fraction:.0%}"
    if run.schedule_given:
        label += ", constant" if run.schedule == "constant" else f", ramped ({run.schedule})"
    return label


def parse_runs(text: str, default_schedule: str = "constant", allowed: Optional[set] = None) -> list[RunSpec]:
    """Parse a comma-separated list of specs; raises :class:`RunSpecError` (empty list, a bad spec,
    duplicates, or a kind not in ``allowed``)."""
    specs = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        run = parse_run_spec(item, default_schedule)
        if allowed is not None and run.kind not in allowed:
            raise RunSpecError(f"run spec {item!r}: {run.kind} runs are not supported here; allowed kinds: {sorted(allowed)}")
        specs.append(run)
    if not specs:
        raise RunSpecError(f"no run spec given; allowed: {GRAMMAR}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or len({s.label for s in specs}) != len(specs):
        raise RunSpecError(f"duplicate runs: {names}")
    return specs
