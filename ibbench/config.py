"""Frozen run configuration and its loader: the one place where user input is validated.

Errors read `<file>: <field>: <problem>; allowed: <…>` (ConfigError) and are raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ibbench.errors import ConfigError

__all__ = ["ConfigError", "RunConfig", "load_run_config", "parse_overrides", "read_yaml"]

PAPER_FGSM_EPS = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("off", "bf16")


@dataclass(frozen=True)
class RunConfig:
    """One training run; defaults follow Kirsch, Lyle & Gal (2020) where the paper states a value."""

    dataset: str = "cifar10"  # a DATASETS name; digits is the CPU-sized one
    data_dir: str | None = None  # where the dataset's files are (cifar10); None: the loader's default folder
    download: bool = False  # fetch missing data; off so offline machines fail fast with a clear error
    encoder: str = "resnet18"  # an ENCODERS name; the paper's deterministic ResNet18
    latent_dim: int = 256  # width of Z; the paper's K = 256
    objective: str = "ib"  # an OBJECTIVES name: ib, or the ce / ce_dropconnect baselines
    beta: float = 0.1  # β'' in [0, 1) of H[Z|Y] + (β''−1) H[Z]; small β'' keeps accuracy (paper fig. 3)
    noise: bool = True  # add zero-entropy noise N(0, I/2πe) to Z while training; without it H[Z] is unbounded
    k: int = 1  # neighbour rank of the k-NN estimator; each class needs more than k samples per batch
    decoders: tuple[str, ...] = ("gmm",)  # DECODERS fitted on frozen latents at each evaluation
    epochs: int = 150  # the paper's schedule
    batch_size: int = 500  # class-balanced, a multiple of the class count; 50 per class on CIFAR-10
    lr: float = 5e-4  # Adam learning rate, the paper's 0.5e-3
    lr_patience: int = 10  # epochs of plateau before the LR is multiplied by √0.1, as in the paper
    dropconnect: float = 0.5  # weight-drop rate of the ce_dropconnect head (Wan et al., 2013)
    augment: bool = True  # pad-4 crop + flip on 32×32 images (ignored for other sizes), the CIFAR standard
    seed: int = 0  # seeds torch, numpy, Python, the loader and any data split
    probe_width: int = 1024  # width of the ResFC fitted on test latents for H[Y|Z]; the paper's 1024
    eval_every: int = 5  # epochs between evaluations (decoders, information plane): they cost ~an epoch
    fgsm_eps: tuple[float, ...] = PAPER_FGSM_EPS  # L∞ radii in [0, 1] pixel units for the final robustness curve
    pgd_steps: int = 0  # > 0 also runs PGD with this many steps at the same radii
    amp: str = "off"  # "bf16": autocast the encoder on GPU (the estimator stays float32)
    channels_last: bool = False  # NHWC memory format for conv encoders on GPU
    device: str = "auto"  # auto: CUDA when present, else CPU

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "<config>") -> RunConfig:
        """Validated RunConfig from plain values (YAML, JSON, a sweep trial); ConfigError names the field."""
        if not isinstance(values, Mapping):
            raise ConfigError(source, "(top level)", f"expected a mapping of fields, got {type(values).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known), key=str)  # key=str: YAML keys may be numbers
        if unknown:
            raise ConfigError(source, str(unknown[0]), "unknown field", ", ".join(known))
        hints = typing.get_type_hints(cls)
        coerced = {name: coerce(source, name, value, hints[name]) for name, value in values.items()}
        cfg = cls(**coerced)
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, source: str = "<config>", **changes: Any) -> RunConfig:
        """A validated copy with some fields changed."""
        return RunConfig.from_dict({**self.to_dict(), **changes}, source)

    def validate(self, source: str = "<config>") -> None:
        """Raise ConfigError for values no run could use; registry names checked against the registries."""
        from ibbench.data import DATASETS, check_batch
        from ibbench.decoders import DECODERS
        from ibbench.models import ENCODERS
        from ibbench.objectives import OBJECTIVES

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
        if not (0.0 <= self.beta < 1.0):
            fail(
                "beta",
                f"β'' = {self.beta} is outside [0, 1)",
                "0 ≤ beta < 1 (β'' = 1/β of the IB Lagrangian)",
            )
        positive = {
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
        for name, value in {"lr_patience": self.lr_patience, "pgd_steps": self.pgd_steps}.items():
            if value < 0:
                fail(name, f"{value} is negative", "an integer ≥ 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            fail("lr", f"{self.lr} is not a positive learning rate", "a number > 0")
        if not (0.0 <= self.dropconnect < 1.0):
            fail("dropconnect", f"{self.dropconnect} is outside [0, 1)", "0 ≤ dropconnect < 1")
        if self.seed < 0:
            fail("seed", f"{self.seed} is negative", "an integer ≥ 0")
        for eps in self.fgsm_eps:
            if not (0.0 <= eps <= 1.0):
                fail(
                    "fgsm_eps",
                    f"ε = {eps} is outside [0, 1] pixel units",
                    "values in [0, 1], e.g. 0.0313 for 8/255",
                )
        if self.device not in DEVICES:
            fail("device", f"unknown device {self.device!r}", ", ".join(DEVICES))
        if self.amp not in AMP_MODES:
            fail("amp", f"unknown mode {self.amp!r}", ", ".join(AMP_MODES))
        # train.run always draws class-balanced batches; only ib needs more than k samples of each class in them.
        try:
            check_batch(
                self.batch_size, DATASETS.get(self.dataset).num_classes, self.k if self.objective == "ib" else 0
            )
        except ValueError as exc:
            allowed = "a multiple of the class count" + (
                " with more than k samples per class" if self.objective == "ib" else ""
            )
            fail("batch_size", str(exc), allowed)


def coerce(source: str, name: str, value: Any, hint: Any) -> Any:
    """value converted to the field's declared type, or ConfigError naming the field and the type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
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
    """SafeLoader that also reads `1e-3` as a float: YAML 1.1 (PyYAML) wants a dot, so `lr: 1e-3` was a string."""


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


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def parse_overrides(items: Sequence[str], source: str = "--set") -> dict[str, Any]:
    """`key=value` strings as a dict; values parsed as YAML scalars/lists (`0.5`, `true`, `[gmm, resfc]`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
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
