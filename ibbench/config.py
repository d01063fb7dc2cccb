"""Frozen run configuration and its loader: the one place where user input is validated.

Errors read `<file>: <field>: <problem>; allowed: <…>` (ConfigError) and are raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ibbench.errors import ConfigError

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "RunConfig",
    "SweepSpec",
    "expand",
    "load_cluster",
    "load_run_config",
    "load_sweep",
    "parse_overrides",
    "read_yaml",
]

PAPER_FGSM_EPS = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("off", "bf16")
# The default attack suite: the paper's FGSM, margin FGSM/PGD, and AutoAttack's APGD-CE, APGD-DLR and Square.
ATTACK_SUITE = ("fgsm", "fgsm_margin", "pgd_margin", "apgd_ce", "apgd_dlr", "square")
# Fields that say where and how a run executes, not what it computes: two machines running the same experiment
# must share one run directory, so these stay out of the run's identity (results.run_id).
PLACEMENT_FIELDS = ("data_dir", "download", "device", "checkpoint_every_s")
# The largest seed every consumer accepts: numpy's legacy RNG and scikit-learn's splits take 32-bit seeds (torch
# takes 64-bit ones); a larger seed would pass validation and crash the run.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class RunConfig:
    """One training run; defaults follow Kirsch, Lyle & Gal (2020) where the paper states a value."""

    dataset: str = "cifar10"  # a DATASETS name; digits is the CPU-sized one
    data_dir: str | None = None  # where the dataset's files are (cifar10); None: the loader's default folder
    download: bool = False  # fetch missing data; off so offline machines fail fast with a clear error
    encoder: str = "resnet18"  # an ENCODERS name; the paper's deterministic ResNet18
    latent_dim: int = 256  # width of Z; the paper's K = 256
    objective: str = "ib"  # an OBJECTIVES name: ib, vib, nlib, or the ce / ce_dropconnect baselines
    beta: float = 0.1  # ib: β'' in [0, 1), small keeps accuracy (paper fig. 3); vib, nlib: β ≥ 0 (see objectives)
    noise: bool | None = None  # zero-entropy noise N(0, I/2πe) on Z in training; None: the objective's (ib: on)
    k: int = 1  # neighbour rank of the k-NN estimator; each class needs more than k samples per batch
    decoders: tuple[str, ...] = ("gmm",)  # DECODERS fitted on frozen latents at each evaluation
    epochs: int = 150  # the paper's schedule
    batch_size: int = 500  # class-balanced, a multiple of the class count; 50 per class on CIFAR-10
    lr: float = 5e-4  # Adam learning rate, the paper's 0.5e-3
    lr_patience: int = 10  # epochs of plateau before the LR is multiplied by √0.1, as in the paper
    dropconnect: float = 0.5  # weight-drop rate of the ce_dropconnect head (Wan et al., 2013)
    dropconnect_per_example: bool = False  # one DropConnect mask per example (Wan et al.) rather than per batch
    vib_samples: int = 1  # vib: reparameterised samples per input in the loss; 1 is Alemi et al.'s estimate
    nlib_noise_var: float = 0.05854983152431917  # nlib: noise variance σ²; 1/(2πe) makes H(Z|X) = 0 as in ib
    nlib_learn_noise: bool = False  # nlib: train σ² (through log σ²) instead of fixing it
    nlib_squared: bool = False  # nlib: the squared-IB variant, β·Î(X;Z)², which Kolchinsky et al. recommend
    augment: bool = True  # pad-4 crop + flip on 32×32 images (ignored for other sizes), the CIFAR standard
    seed: int = 0  # seeds torch, numpy, Python, the loader and any data split
    probe_width: int = 1024  # width of the ResFC fitted on test latents for H[Y|Z]; the paper's 1024
    probe_folds: int = 5  # H[Y|Z] is cross-fitted: K probes, each scored on the fold of test latents it did not see
    val_fraction: float = 0.1  # of the training split, held out (stratified, fixed per dataset) for all selection
    eval_every: int = 5  # epochs between evaluations (decoders, information plane): they cost ~an epoch
    fgsm_eps: tuple[float, ...] = PAPER_FGSM_EPS  # L∞ radii in [0, 1] pixel units for the final robustness curve
    # The attack suite (ibbench.attacks): every radius of fgsm_eps is attacked by each of these; the report ranks
    # by the per-image worst case over them. fgsm is the paper's (cross-entropy); the margin/DLR attacks see
    # through a saturated softmax and Square through any gradient masking.
    attacks: tuple[str, ...] = ATTACK_SUITE  # attack names (ibbench.attacks.ATTACKS), the suite described above
    pgd_steps: int = 20  # gradient steps of each PGD restart (pgd, pgd_margin)
    pgd_restarts: int = 1  # PGD restarts from random points; an image counts as broken if any restart breaks it
    pgd_step_size: float = 2.5  # PGD step α = pgd_step_size · ε / pgd_steps (Madry et al.'s 2.5: can cross the ball)
    apgd_steps: int = 100  # APGD-CE / APGD-DLR iterations, AutoAttack's standard 100
    apgd_restarts: int = 1  # APGD restarts, AutoAttack's standard version uses 1
    square_queries: int = 1000  # Square's query budget per image and radius (the black-box check of the gradients)
    attack_images: int = 1000  # size of the fixed class-stratified test subset attacked (all of digits' 450)
    attack_seed: int = 0  # seeds the attacked subset, random starts and Square's search, apart from training
    eot_draws: int = 0  # 0: attack the deterministic model (noise off); N: average N latent-noise draws (EOT)
    amp: str = "off"  # "bf16": autocast the encoder on GPU (the estimator stays float32)
    tf32: bool = False  # TF32 for float32 matmuls/convolutions on Ampere+ GPUs; off: IEEE float32, as the paper ran
    channels_last: bool = False  # NHWC memory format for conv encoders on GPU
    device: str = "auto"  # auto: CUDA when present, else CPU
    # A ResNet18 checkpoint is ~129 MiB against 1-3 s GPU epochs. The last epoch and SIGTERM/SIGUSR2 (preemption,
    # requeue, scancel) always checkpoint, so the periodic one only bounds what a SIGKILL or a crash loses.
    checkpoint_every_s: float = 300.0  # seconds between periodic checkpoints, at epoch ends; 0: every epoch

    def __post_init__(self) -> None:
        if self.noise is None:  # the objective's default, so every stored config says what ran
            from ibbench.objectives import OBJECTIVES

            if self.objective in OBJECTIVES:
                object.__setattr__(self, "noise", OBJECTIVES.get(self.objective).noise_default)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "<config>") -> RunConfig:
        """Validated RunConfig from plain values (YAML, JSON, a sweep trial); ConfigError names the field."""
        if not isinstance(values, Mapping):
            raise ConfigError(source, "(top level)", f"expected a mapping of fields, got {type(values).__name__}")
        hints = _hints(cls)  # resolved once: get_type_hints per call was most of a sweep's validation time
        unknown = sorted(set(values) - set(hints), key=str)  # key=str: YAML keys may be numbers
        if unknown:
            raise ConfigError(source, str(unknown[0]), "unknown field", ", ".join(hints))
        coerced = {name: coerce(source, name, value, hints[name]) for name, value in values.items()}
        cfg = cls(**coerced)
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples as lists)."""
        # Fields are flat (scalars and tuples of scalars): no deep copy via dataclasses.asdict needed.
        values = ((name, getattr(self, name)) for name in _hints(RunConfig))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values}

    def identity(self) -> str:
        """What the run computes: its values minus the placement fields, as sorted compact JSON (see run_id)."""
        cached = self.__dict__.get("_identity")  # computed once: a sweep asks it for every run several times
        if cached is None:
            values = {k: v for k, v in self.to_dict().items() if k not in PLACEMENT_FIELDS}
            cached = json.dumps(values, sort_keys=True, separators=(",", ":"))
            object.__setattr__(self, "_identity", cached)
        return cached

    def replace(self, source: str = "<config>", **changes: Any) -> RunConfig:
        """A validated copy with some fields changed."""
        return RunConfig.from_dict({**self.to_dict(), **changes}, source)

    def validate(self, source: str = "<config>") -> None:
        """Raise ConfigError for values no run could use; registry names checked against the registries."""
        DATASETS, DECODERS, ENCODERS, OBJECTIVES, check_batch = _registries()

        def fail(name: str, problem: str, allowed: str | None = None) -> typing.NoReturn:
            raise ConfigError(source, name, problem, allowed)

        for name, registry in (("dataset", DATASETS), ("encoder", ENCODERS), ("objective", OBJECTIVES)):
            if getattr(self, name) not in registry:
                fail(name, f"unknown {name} {getattr(self, name)!r}", ", ".join(registry.names()))
        if not self.decoders:
            fail("decoders", "at least one decoder is needed", ", ".join(DECODERS.names()))
        for name in self.decoders:
            if name not in DECODERS:
                fail("decoders", f"unknown decoder {name!r}", ", ".join(DECODERS.names()))
        if len(set(self.decoders)) != len(self.decoders):
            fail("decoders", f"{list(self.decoders)} lists a decoder twice")
        objective = OBJECTIVES.get(self.objective)
        try:
            objective.check_beta(self.beta)  # each objective's range lives on its class
        except ValueError as exc:
            fail("beta", str(exc).split(": ", 1)[0], objective.beta_allowed())
        if self.noise and not objective.noise_allowed:
            fail("noise", f"{self.objective} brings its own noise; the zero-entropy noise would add more", "false")
        positive = {
            "vib_samples": self.vib_samples,
            "latent_dim": self.latent_dim,
            "k": self.k,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "eval_every": self.eval_every,
            "probe_width": self.probe_width,
        }
        for name, value in positive.items():
            if value < 1:
                fail(name, f"{value} is not a positive integer", "an integer ≥ 1")
        for name, value in {"lr_patience": self.lr_patience, "attack_seed": self.attack_seed}.items():
            if value < 0:
                fail(name, f"{value} is negative", "an integer ≥ 0")
        self._validate_attacks(fail)
        if not (math.isfinite(self.lr) and self.lr > 0):
            fail("lr", f"{self.lr} is not a positive learning rate", "a number > 0")
        if not (0.0 <= self.dropconnect < 1.0):
            fail("dropconnect", f"{self.dropconnect} is outside [0, 1)", "0 ≤ dropconnect < 1")
        if not 0.0 < self.val_fraction <= 0.5:
            fail("val_fraction", f"{self.val_fraction} is outside (0, 0.5]", "a fraction, e.g. 0.1")
        if self.probe_folds < 2:
            fail("probe_folds", f"{self.probe_folds} folds cannot cross-fit", "an integer ≥ 2")
        if not self.nlib_noise_var > 0:
            fail("nlib_noise_var", f"{self.nlib_noise_var} is not a positive variance", "a number > 0")
        if self.seed < 0:
            fail("seed", f"{self.seed} is negative", f"an integer ≥ 0 and ≤ {MAX_SEED} (2**32 − 1)")
        if self.seed > MAX_SEED:
            fail("seed", f"{self.seed} is too large: numpy and scikit-learn take 32-bit seeds",
                 f"an integer ≥ 0 and ≤ {MAX_SEED} (2**32 − 1)")  # fmt: skip
        for eps in self.fgsm_eps:
            if not (0.0 <= eps <= 1.0):
                fail(
                    "fgsm_eps",
                    f"ε = {eps} is outside [0, 1] pixel units",
                    "values in [0, 1], e.g. 0.0313 for 8/255",
                )
        if self.checkpoint_every_s < 0:
            fail("checkpoint_every_s", f"{self.checkpoint_every_s} is negative", "seconds ≥ 0 (0: every epoch)")
        if self.device not in DEVICES:
            fail("device", f"unknown device {self.device!r}", ", ".join(DEVICES))
        if self.amp not in AMP_MODES:
            fail("amp", f"unknown mode {self.amp!r}", ", ".join(AMP_MODES))
        # train.run always draws class-balanced batches; objectives with a per-class k-NN estimate need more than
        # k samples of each class in them.
        try:
            check_batch(self.batch_size, DATASETS.get(self.dataset).num_classes, self.batch_k)
        except ValueError as exc:
            allowed = "a multiple of the class count" + (" with more than k samples per class" if self.batch_k else "")
            fail("batch_size", str(exc), allowed)

    @property
    def batch_k(self) -> int:
        """k when the objective estimates entropies per class on each batch (each class needs > k), else 0."""
        from ibbench.objectives import OBJECTIVES

        return self.k if OBJECTIVES.get(self.objective).knn_batches else 0

    def _validate_attacks(self, fail: Callable[..., typing.NoReturn]) -> None:
        """The attack fields: known names, positive budgets, a loss the dataset's classes allow."""
        from ibbench.attacks import ATTACKS

        DATASETS = _registries()[0]

        if not self.attacks:
            fail("attacks", "at least one attack is needed", ", ".join(ATTACKS))
        for name in self.attacks:
            if name not in ATTACKS:
                fail("attacks", f"unknown attack {name!r}", ", ".join(ATTACKS))
        if len(set(self.attacks)) != len(self.attacks):
            fail("attacks", f"{list(self.attacks)} lists an attack twice")
        counts = {
            "pgd_steps": self.pgd_steps,
            "pgd_restarts": self.pgd_restarts,
            "apgd_steps": self.apgd_steps,
            "apgd_restarts": self.apgd_restarts,
            "square_queries": self.square_queries,
            "attack_images": self.attack_images,
        }
        for name, value in counts.items():
            if value < 1:
                fail(name, f"{value} is not a positive integer", "an integer ≥ 1")
        if self.eot_draws < 0:
            fail("eot_draws", f"{self.eot_draws} is negative", "0 (noise off during attacks) or draws ≥ 1 (EOT)")
        if not (math.isfinite(self.pgd_step_size) and self.pgd_step_size > 0):
            fail("pgd_step_size", f"{self.pgd_step_size} is not a positive step", "a number > 0 (times ε/pgd_steps)")
        if "apgd_dlr" in self.attacks and self.dataset in DATASETS and DATASETS.get(self.dataset).num_classes < 3:
            fail("attacks", "apgd_dlr's DLR loss needs at least 3 classes", "the other attacks")


@functools.cache
def _registries() -> tuple:
    """DATASETS, DECODERS, ENCODERS, OBJECTIVES and check_batch, imported on first use (they import torch)."""
    from ibbench.data import DATASETS, check_batch
    from ibbench.decoders import DECODERS
    from ibbench.models import ENCODERS
    from ibbench.objectives import OBJECTIVES

    return DATASETS, DECODERS, ENCODERS, OBJECTIVES, check_batch


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A dataclass's resolved field types, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def _shape(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """typing.get_origin and get_args of a field type, once per type (they cost more than the check itself)."""
    return typing.get_origin(hint), typing.get_args(hint)


def coerce(source: str, name: str, value: Any, hint: Any) -> Any:
    """value converted to the field's declared type, or ConfigError naming the field and the type."""
    origin, args = _shape(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(source, name, value, inner)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(source, name, f"expected a list, got {value!r}", f"a list of {args[0].__name__}")
        return tuple(coerce(source, name, v, args[0]) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(source, name, f"expected true or false, got {value!r}", "true, false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(source, name, f"expected an integer, got {value!r}", "an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(source, name, f"expected a finite number, got {value!r}", "a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(source, name, f"expected a string, got {value!r}", "a string")
    raise TypeError(f"RunConfig field {name} has an unsupported type {hint}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants a dot, so `lr: 1e-3` was a string) and refuses
    a key given twice in one mapping (PyYAML keeps the last silently, so a sweep would run something else)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = lines.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first})", key_node.start_mark
                    )
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def read_yaml(path: str | Path) -> Any:
    """Parsed YAML of path; ConfigError for a missing file or a YAML syntax error."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(source, "(file)", f"cannot read: {exc.strerror or exc}") from None
    try:
        return _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(yaml)"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(source, where, f"invalid YAML: {problem}") from None


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def parse_overrides(items: Sequence[str], source: str = "--set") -> dict[str, Any]:
    """`key=value` strings as a dict; values parsed as YAML scalars/lists (`0.5`, `true`, `[gmm, resfc]`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise ConfigError(source, item, "expected key=value", "e.g. --set beta=0.3 --set decoders=[gmm,resfc]")
        try:
            out[key] = _load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(source, key, f"cannot parse value {raw!r}") from None
    return out


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> RunConfig:
    """RunConfig from a YAML file (or the defaults when path is None) with `key=value` overrides applied."""
    values: dict[str, Any] = {}
    source = str(path) if path is not None else "<defaults>"
    if path is not None:
        loaded = read_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(source, "(top level)", f"expected a mapping of fields, got {type(loaded).__name__}")
        values.update(loaded)
    extra = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise ConfigError(
            "--set", unknown[0], "unknown field", ", ".join(f.name for f in dataclasses.fields(RunConfig))
        )
    values.update(extra)
    return RunConfig.from_dict(values, source)


# ---------------------------------------------------------------------------------------------------------------
# Sweeps

SWEEP_NAME = re.compile(r"[a-z0-9_-]+")  # matched with fullmatch
SWEEP_KEYS = ("name", "base", "grid", "baselines", "search", "resources", "max_concurrent", "max_runs")
MAX_RUNS = 100_000  # default cap on a grid's size: a typo'd axis must not build millions of configs first
DECODER_AXIS = "decoder"  # a grid axis of single decoders, folded into each run's `decoders` list
SEARCH_ALGORITHMS = ("optuna",)
SCHEDULERS = ("none", "asha")
DOMAINS = ("uniform", "loguniform", "int", "choice")


@dataclass(frozen=True)
class Resources:
    """Per-trial resources; fractional GPUs pack several small trials onto one card."""

    cpu: float = 1.0  # CPU cores a trial reserves (also its torch thread count)
    gpu: float = 0.0  # GPUs a trial reserves; 0.25 runs four trials per GPU


@dataclass(frozen=True)
class SearchSpec:
    """An Optuna search through Ray Tune instead of a grid."""

    space: tuple[tuple[str, str, tuple[Any, ...]], ...]  # (field, domain, arguments), e.g. ("beta", "uniform", (0, 1))
    metric: str = "val_acc/gmm"  # a validation metric the search optimises (last eval epoch); never a test one
    mode: str = "max"  # max or min
    num_samples: int = 16  # trials in the study in all: re-running the sweep tops the study up to this
    algorithm: str = "optuna"  # TPE sampling, study kept in <out>/<sweep>/optuna.db
    scheduler: str = "none"  # asha: stop weak trials early (search algorithms cannot stop trials themselves)
    grace_period: int = 1  # ASHA: evaluations a trial gets before it may be stopped
    seed: int = 0  # the sampler's seed, so a study is reproducible


@dataclass(frozen=True)
class SweepSpec:
    """A sweep file, validated: base fields, grid axes, fixed baselines, or an Optuna search."""

    name: str  # [a-z0-9_-]+: the folder <out>/<name>/
    base: tuple[tuple[str, Any], ...]  # RunConfig fields shared by every run
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # axes of the grid product; `decoder` folds into decoders
    baselines: tuple[tuple[tuple[str, Any], ...], ...] = ()  # fixed extra runs over base, crossed with seeds
    search: SearchSpec | None = None  # an Optuna search instead of the grid
    resources: Resources = Resources()  # per trial
    max_concurrent: int | None = None  # cap on trials at once (None: as many as resources allow)
    max_runs: int = MAX_RUNS  # a grid larger than this is refused before it is built (raise it on purpose)
    source: str = "<sweep>"  # the file it came from, for error messages
    runs: tuple[RunConfig, ...] = dataclasses.field(default=(), compare=False, repr=False)  # the grid, expanded once

    @property
    def base_dict(self) -> dict[str, Any]:
        return dict(self.base)

    @property
    def grid_dict(self) -> dict[str, tuple[Any, ...]]:
        return dict(self.grid)


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple((str(k), _freeze(v)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _run_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(RunConfig))


def _check_mapping(source: str, field: str, value: Any, allowed: Sequence[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(source, field, f"expected a mapping, got {type(value).__name__}", ", ".join(allowed))
    for key in value:
        if key not in allowed:
            raise ConfigError(source, f"{field}.{key}", "unknown field", ", ".join(allowed))
    return dict(value)


def _number(
    source: str, field: str, value: Any, minimum: float, integer: bool = False, maximum: float = math.inf
) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok or not minimum <= value <= maximum:
        kind = "an integer" if integer else "a number"
        bounds = f"≥ {minimum:g}" if maximum == math.inf else f"in [{minimum:g}, {maximum:.0f}]"
        raise ConfigError(source, field, f"{value!r} is not {kind} {bounds}", f"{kind} {bounds}")
    return int(value) if integer else float(value)


def _parse_search(source: str, raw: Any) -> SearchSpec:
    names = [f.name for f in dataclasses.fields(SearchSpec)]
    values = _check_mapping(source, "search", raw, names)
    algorithm = values.get("algorithm", "optuna")
    if algorithm not in SEARCH_ALGORITHMS:
        raise ConfigError(source, "search.algorithm", f"unknown algorithm {algorithm!r}", ", ".join(SEARCH_ALGORITHMS))
    mode = values.get("mode", "max")
    if mode not in ("max", "min"):
        raise ConfigError(source, "search.mode", f"unknown mode {mode!r}", "max, min")
    scheduler = values.get("scheduler", "none") or "none"
    if scheduler not in SCHEDULERS:
        raise ConfigError(source, "search.scheduler", f"unknown scheduler {scheduler!r}", ", ".join(SCHEDULERS))
    metric = values.get("metric", "val_acc/gmm")
    if not isinstance(metric, str) or not metric:
        raise ConfigError(source, "search.metric", f"{metric!r} is not a metric name", "a metrics.jsonl key")
    space_raw = values.get("space")
    if not isinstance(space_raw, Mapping) or not space_raw:
        raise ConfigError(source, "search.space", "a non-empty mapping of fields to domains is needed",
                          "e.g. {beta: {uniform: [0.0, 0.99]}, k: {int: [1, 20]}}")  # fmt: skip
    space = []
    fields = _run_fields()
    for key, domain in space_raw.items():
        where = f"search.space.{key}"
        if key not in fields:
            raise ConfigError(source, where, "not a RunConfig field", ", ".join(fields))
        if not isinstance(domain, Mapping) or len(domain) != 1 or next(iter(domain)) not in DOMAINS:
            raise ConfigError(source, where, f"bad domain {domain!r}", "one of {uniform|loguniform|int: [lo, hi]}, "
                              "{choice: [a, b, ...]}")  # fmt: skip
        kind, args = next(iter(domain.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(source, f"{where}.{kind}", f"expected a list, got {args!r}", "[lo, hi] or [a, b, ...]")
        if kind != "choice":
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ConfigError(source, f"{where}.{kind}", f"expected [lo, hi], got {args!r}", "two numbers")
            lo, hi = args
            if not lo < hi or (kind == "loguniform" and lo <= 0) or (kind == "int" and not all(
                float(a).is_integer() for a in args
            )):  # fmt: skip
                raise ConfigError(source, f"{where}.{kind}", f"[{lo}, {hi}] is not a valid range",
                                  "lo < hi; loguniform needs lo > 0; int needs integers")  # fmt: skip
        space.append((key, kind, tuple(args)))
    return SearchSpec(
        space=tuple(space),
        metric=metric,
        mode=mode,
        num_samples=_number(source, "search.num_samples", values.get("num_samples", 16), 1, integer=True),
        algorithm=algorithm,
        scheduler=scheduler,
        grace_period=_number(source, "search.grace_period", values.get("grace_period", 1), 1, integer=True),
        seed=_number(source, "search.seed", values.get("seed", 0), 0, integer=True, maximum=MAX_SEED),
    )


def load_sweep(
    path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = (), max_runs: int | None = None
) -> SweepSpec:
    """SweepSpec from a sweep YAML file, `key=value` overrides applied to base; every run it implies validated.
    max_runs, when given (`--max-runs`), replaces the file's cap on the grid's size."""
    source = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, Mapping):
        raise ConfigError(source, "(top level)", "expected a mapping with name, base, grid, …", ", ".join(SWEEP_KEYS))
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(source, str(key), "unknown sweep key", ", ".join(SWEEP_KEYS))
    name = raw.get("name")
    if not isinstance(name, str) or not SWEEP_NAME.fullmatch(name):  # fullmatch: `$` would accept "name\n"
        raise ConfigError(source, "name", f"{name!r} is not a valid sweep name",
                          "lower-case letters, digits, '_' and '-' (it names a folder under --out)")  # fmt: skip
    fields = _run_fields()
    base = _check_mapping(source, "base", raw.get("base"), fields)
    extra = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    for key in extra:
        if key not in fields:
            raise ConfigError("--set", key, "unknown field", ", ".join(fields))
    base.update(extra)
    grid_raw = _check_mapping(source, "grid", raw.get("grid"), (*fields, DECODER_AXIS))
    grid = []
    for key, values in grid_raw.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(source, f"grid.{key}", f"expected a non-empty list of values, got {values!r}",
                              "e.g. [0.0, 0.3, 0.6]")  # fmt: skip
        grid.append((key, tuple(_freeze(v) for v in values)))
    if DECODER_AXIS in grid_raw and "decoders" in grid_raw:
        raise ConfigError(source, "grid.decoder", "give either a decoder axis or a decoders axis, not both")
    baselines_raw = raw.get("baselines") or []
    if not isinstance(baselines_raw, list):
        raise ConfigError(source, "baselines", "expected a list of field mappings", "e.g. [{objective: ce}]")
    baselines = []
    for i, b in enumerate(baselines_raw):
        entry = _check_mapping(source, f"baselines[{i}]", b, fields) or {}
        for key, value in entry.items():
            if isinstance(value, list) and not value:
                raise ConfigError(source, f"baselines[{i}].{key}", "an empty list gives no runs",
                                  "a value, or a non-empty list of values (the entry's own axis)")  # fmt: skip
        baselines.append(_freeze(entry))
    search = None
    if raw.get("search") is not None:
        search = _parse_search(source, raw["search"])
        if grid or baselines:
            raise ConfigError(source, "search", "a search sweep takes no grid or baselines (put fixed fields in base)",
                              "either grid/baselines or search")  # fmt: skip
    res = _check_mapping(source, "resources", raw.get("resources"), ("cpu", "gpu"))
    resources = Resources(
        cpu=_number(source, "resources.cpu", res.get("cpu", 1.0), 0.01),
        gpu=_number(source, "resources.gpu", res.get("gpu", 0.0), 0.0),
    )
    if resources.gpu > 1 and not float(resources.gpu).is_integer():
        raise ConfigError(source, "resources.gpu", f"{resources.gpu} GPUs", "a fraction below 1, or whole GPUs")
    max_concurrent = raw.get("max_concurrent")
    if max_concurrent is not None:
        max_concurrent = _number(source, "max_concurrent", max_concurrent, 1, integer=True)
    if max_runs is None:
        max_runs = _number(source, "max_runs", raw.get("max_runs", MAX_RUNS), 1, integer=True)
    else:
        max_runs = _number("--max-runs", "--max-runs", max_runs, 1, integer=True)
    size = math.prod(len(values) for key, values in grid if key != DECODER_AXIS) + len(baselines) * len(
        dict(grid).get("seed", (None,))
    )
    if size > max_runs:
        raise ConfigError(source, "grid", f"{size} runs exceed max_runs = {max_runs}", f"at most {max_runs} "
                          "runs; set max_runs in the sweep file (or --max-runs) to allow more")  # fmt: skip
    spec = SweepSpec(
        name=name,
        base=tuple((k, _freeze(v)) for k, v in base.items()),  # lists as tuples: the spec stays hashable
        grid=tuple(grid),
        baselines=tuple(baselines),
        search=search,
        resources=resources,
        max_concurrent=max_concurrent,
        max_runs=max_runs,
        source=source,
    )
    # Every run the sweep implies is built, and so validated, now, before anything starts; once per command.
    runs = tuple(expand(spec))
    if search is not None:
        _check_metric(spec)
    return dataclasses.replace(spec, runs=runs)


def _check_metric(spec: SweepSpec) -> None:
    """search.metric must be a metric every trial reports (a typo would train a trial, then fail the search)."""
    from ibbench.metrics import SELECTABLE_PREFIXES, reported_metrics

    space = {key: args for key, kind, args in spec.search.space if kind == "choice"}
    base = {k: plain(v) for k, v in spec.base}
    objectives = space.get("objective", [base.get("objective", RunConfig.objective)])
    decoder_lists = space.get("decoders", [base.get("decoders", RunConfig.decoders)])
    known = None
    for objective in objectives:
        for decoders in decoder_lists:
            names = set(reported_metrics(objective, plain(decoders)))
            known = names if known is None else known & names
    allowed = ", ".join(sorted(m for m in known if m.startswith(SELECTABLE_PREFIXES)))
    if spec.search.metric in known and not spec.search.metric.startswith(SELECTABLE_PREFIXES):
        raise ConfigError(spec.source, "search.metric", f"{spec.search.metric!r} is measured on the test set, which "
                          "no search may select on (use the validation split's)", allowed)  # fmt: skip
    if spec.search.metric not in known:
        raise ConfigError(spec.source, "search.metric", f"{spec.search.metric!r} is not a metric the runs report",
                          allowed)  # fmt: skip


# -- expansion ---------------------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """Frozen spec values back to YAML/JSON shapes (tuples of pairs → dicts, tuples → lists)."""
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
                                                  for v in value):  # fmt: skip
        return {k: plain(v) for k, v in value}
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def _where(field: str, origins: dict[str, str]) -> str:
    """The sweep-file path of a RunConfig field's value (`grid.beta`, `base.k`), or the bare field for a default.

    A batch too small for k involves two fields; the error names the one the sweep varies (grid, baselines,
    search space) rather than the shared one, since that is the value that made this run invalid.
    """
    varied = ("grid", "baselines", "search")
    if field == "batch_size" and origins.get("k", "").startswith(varied):
        if not origins.get("batch_size", "").startswith(varied):
            return origins["k"]
    return origins.get(field, field)


def _make(spec: SweepSpec, values: dict[str, Any], origins: dict[str, str]) -> RunConfig:
    """RunConfig from merged values; a ConfigError names the sweep file and where the bad value came from."""
    try:
        return RunConfig.from_dict(values, spec.source)
    except ConfigError as exc:
        raise ConfigError(spec.source, _where(exc.field, origins), exc.problem, exc.allowed) from None


_TUPLE_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if typing.get_origin(f.type) is tuple
                      or str(f.type).startswith("tuple"))  # fmt: skip


def _is_axis(field: str, value: Any) -> bool:
    """A list in a baselines entry is an axis of values, except the value of a list field (a list of lists is)."""
    if not isinstance(value, list):
        return False
    return field not in _TUPLE_FIELDS or (bool(value) and all(isinstance(v, list) for v in value))


def expand(spec: SweepSpec) -> list[RunConfig]:
    """Every run of a grid sweep (grid product, then baselines × seeds), duplicates removed, in order.

    The `decoder` axis is folded into each run's `decoders` list: runs that differ only in the decoder share one
    encoder training. A list in a baselines entry is that entry's own axis (`{objective: vib, beta: [0.001, 0.01]}`
    is two runs per seed), so objectives whose parameters mean different things sit in one sweep. A search sweep
    has no fixed runs: its base and every domain endpoint are validated and [] returned. A spec from load_sweep
    carries its runs already (expanded once per command).
    """
    if spec.runs:
        return list(spec.runs)
    base = {k: plain(v) for k, v in spec.base}
    origins = {k: f"base.{k}" for k in base}  # field -> where its value is written in the sweep file
    grid = {k: [plain(v) for v in values] for k, values in spec.grid}
    if spec.search is not None:
        for key, kind, args in spec.search.space:
            probes = args if kind == "choice" else (args[0], args[-1])
            for value in probes:
                _make(spec, {**base, key: value}, {**origins, key: f"search.space.{key}"})
        _make(spec, base, origins)
        return []
    decoders = grid.pop(DECODER_AXIS, None)
    if decoders is not None:
        base["decoders"] = list(dict.fromkeys(decoders))  # a decoder listed twice is one decoder, as in other axes
        origins["decoders"] = f"grid.{DECODER_AXIS}"
    keys = list(grid)
    runs: list[RunConfig] = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = {**base, **dict(zip(keys, combo, strict=True))}
        runs.append(_make(spec, values, {**origins, **{k: f"grid.{k}" for k in keys}}))
    seeds = grid.get("seed", [base.get("seed", RunConfig.seed)])
    for i, baseline in enumerate(spec.baselines):
        fixed = {k: plain(v) for k, v in baseline}
        where = {**origins, **{k: f"baselines[{i}].{k}" for k in fixed}}
        axes = {k: v for k, v in fixed.items() if _is_axis(k, v)}  # an entry's lists are its own grid
        for combo in itertools.product(*axes.values()):
            for seed in seeds:
                values = {**base, **fixed, **dict(zip(axes, combo, strict=True)), "seed": seed}
                runs.append(_make(spec, values, where))
    unique: dict[str, RunConfig] = {}
    for cfg in runs:
        unique.setdefault(cfg.identity(), cfg)
    return list(unique.values())


# ---------------------------------------------------------------------------------------------------------------
# SLURM clusters


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how big the SLURM jobs are; validated by load_cluster."""

    partition: str | None = None  # SLURM partition; None: the cluster's default
    account: str | None = None  # --account, where clusters bill by project
    qos: str | None = None  # --qos
    time_min: int = 240  # wall-time limit of each job, minutes; jobs requeue themselves when it runs out
    nodes: int = 1  # allocation launcher: nodes of the Ray cluster (one task per node)
    cpus_per_node: int = 8  # allocation launcher: CPUs of each node's task
    gpus_per_node: int = 0  # allocation launcher: GPUs of each node
    mem_gb: float | None = None  # memory per job (allocation node or array task); None: the cluster's default
    setup: tuple[str, ...] = ()  # shell lines run before python (module load, activate an environment)
    sbatch: tuple[tuple[str, Any], ...] = ()  # extra sbatch parameters, e.g. {constraint: a100, exclude: node7}
    array_parallelism: int = 16  # slurm-array: array tasks running at once
    max_requeues: int = 5  # requeues after timeout/preemption before a job gives up
    source: str = "<cluster>"  # the file it came from, for messages


def load_cluster(path: str | Path) -> ClusterConfig:
    """ClusterConfig from a YAML file; ConfigError names the file and field."""
    source = str(path)
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    names = [f.name for f in dataclasses.fields(ClusterConfig) if f.name != "source"]
    if not isinstance(raw, dict):
        raise ConfigError(source, "(top level)", "expected a mapping of cluster fields", ", ".join(names))
    for key in raw:
        if key not in names:
            raise ConfigError(source, str(key), "unknown field", ", ".join(names))
    values: dict[str, Any] = {"source": source}
    for key in ("partition", "account", "qos"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], str) or not raw[key] or any(c.isspace() for c in raw[key]):
                raise ConfigError(source, key, f"{raw[key]!r} is not a name", "a SLURM name without spaces")
            values[key] = raw[key]
    minimums = {"time_min": 1, "nodes": 1, "cpus_per_node": 1, "gpus_per_node": 0, "array_parallelism": 1,
                "max_requeues": 0}  # fmt: skip
    for key, minimum in minimums.items():
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(source, key, f"{value!r} is not an integer ≥ {minimum}", f"an integer ≥ {minimum}")
            values[key] = value
    if raw.get("mem_gb") is not None:
        mem = raw["mem_gb"]
        if isinstance(mem, bool) or not isinstance(mem, (int, float)) or mem <= 0:
            raise ConfigError(source, "mem_gb", f"{mem!r} is not a positive number", "GB, e.g. 64")
        values["mem_gb"] = float(mem)
    setup = raw.get("setup") or []
    if not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
        raise ConfigError(source, "setup", "expected a list of shell lines", "e.g. [module load cuda]")
    values["setup"] = tuple(setup)
    sbatch = raw.get("sbatch") or {}
    if not isinstance(sbatch, dict):
        raise ConfigError(source, "sbatch", "expected a mapping of sbatch options", "e.g. {constraint: a100}")
    values["sbatch"] = tuple((str(k), v) for k, v in sbatch.items())
    return ClusterConfig(**values)
