"""Report tables: done runs aggregated per configuration (mean ± standard error over seeds), as DataFrames.

A *configuration* is every RunConfig field except the seed and the placement fields: the runs of one
configuration differ only in their seed, and the error bars (mean ± standard error, s.e. = sample std / √n)
are computed over those runs only, never across hyperparameters. For the cross-entropy baselines β'' and k mean
nothing, so they are dropped from the configuration and shown as "–" (noise too, unless a baseline is run both
ways). Decoders are a row dimension: one accuracy row per (configuration, decoder).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ibbench import results
from ibbench.attacks import (
    ATTACK_LABELS,
    ATTACK_LOSSES,
    ATTACKS,
    BREAK_ACCURACY,
    BREAK_EPS,
    CE_BLIND_SHARE,
    CHANCE_FACTOR,
    PAPER_ATTACK,
    SQUARE_GAP,
    WORST,
)
from ibbench.config import PLACEMENT_FIELDS, RunConfig

# -- objectives, as the registry describes them (the report names none) --------------------------------------------


def _objective(name: Any):
    from ibbench.objectives import OBJECTIVES

    return OBJECTIVES.get(name) if isinstance(name, str) and name in OBJECTIVES else None


def objective_label(name: Any) -> str:
    """How reports name an objective: its class's label (IB, VIB, NLIB, CE, CE+DropConnect)."""
    cls = _objective(name)
    return cls.label if cls is not None else str(name)


def is_reference(name: Any) -> bool:
    """Objectives without a β (the cross-entropy baselines): drawn as reference lines, listed first."""
    cls = _objective(name)
    return cls is not None and cls.beta_meaning is None


def beta_symbol(name: Any) -> str:
    """β'' for ib, β for vib and nlib: what the objective's `beta` is."""
    cls = _objective(name)
    return cls.beta_symbol if cls is not None else "β"


def objective_noise_default(name: Any) -> bool:
    """Whether the objective trains with the zero-entropy noise unless told otherwise (ib)."""
    cls = _objective(name)
    return bool(cls is not None and cls.noise_default)


def objective_order(name: Any) -> tuple:
    """Reference objectives first, then the others, each group in the registry's (alphabetical) order, ib first."""
    return (0 if is_reference(name) else 1, name != "ib", str(name))


def unused_fields_of(name: Any) -> tuple[str, ...]:
    from ibbench.objectives import unused_fields

    return unused_fields(name) if _objective(name) is not None else ()


NOT_IDENTITY = ("seed", *PLACEMENT_FIELDS)
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))
ALWAYS_SHOWN = ("objective", "beta", "noise", "k")
HEAD = "head"  # the decoder name under which the baselines report their own classifier (train.HEAD)
PREFERRED_DECODER = "gmm"  # the paper's decoder for figure 1
DASH = "–"
ATTACK_ORDER = (WORST, *ATTACKS)  # the worst case first, then the paper's FGSM and the rest
KEY_LABELS = {
    "objective": "objective",
    "beta": "β''",
    "noise": "noise",
    "k": "k",
    "decoder": "decoder",
    "attack": "attack",
    "rank": "rank",
    "n": "n",
    "sweep": "sweep",
    "run_id": "run",
    "status": "status",
    "seed": "seed",
    "epochs_done": "epochs done",
    "reason": "reason",
    "check": "check",
    "note": "note",
    "verdict": "verdict",
    "reasons": "reasons",
}

CAVEAT = (
    "I[X;Z] = H[Z] comes from the k-nearest-neighbour entropy estimator (Kozachenko–Leonenko / Kraskov et al.) "
    "on the test latents with the zero-entropy noise ε added. At high latent dimension (d ≥ 64) its absolute "
    "values are biased (10–16 % high in our checks) and not invariant to affine maps of Z, so read them as "
    "relative values: compare runs with the same latent dimension d, sample size N and neighbour rank k, not "
    "absolute nats across settings. For a run trained with the noise, Z+ε is the model's own latent and the value "
    "is its I[X;Z]; a run trained without it has a deterministic latent whose I[X;Z] is infinite, so its value is "
    "I[X;Z+ε] with the evaluation noise added, marked as such, and the k-NN H[Z] of its noise-free latents is "
    "listed beside it. H[Y|Z] is cross-fitted: K ResFC probes, each fitted on the other folds of the test latents "
    "and scored on the fold it never saw, a held-out cross-entropy and so an upper bound on H[Y|Z] in "
    "expectation; the in-sample value (probes scored on their own training latents, as the paper reports) is "
    "lower and is given for comparison only. Best epochs are chosen by the validation split (lowest validation "
    "H[Y|Z]), never by the test set."
)

ROBUSTNESS_CAVEAT = (
    "Robustness is the per-image worst case over a suite of L∞ attacks on a fixed class-stratified test subset: "
    "the paper's FGSM on the cross-entropy, FGSM and PGD on the logit margin, and AutoAttack's APGD-CE, APGD-DLR "
    "and gradient-free Square attack (torchattacks); an image counts as robust only if no attack flips it. This is "
    "because a single cross-entropy attack is blind wherever the float32 softmax saturates (compressed latents "
    "make class log-likelihoods differ by hundreds of nats, so the input gradient is exactly zero) and then "
    "overstates robustness; the diagnostics table flags such models, and a worst case that still looks masked is "
    "marked unreliable instead of being ranked."
)


def attack_settings_text(runs: pd.DataFrame) -> str:
    """One paragraph: the attack settings the done runs used, and whether the latent noise was on during attacks."""
    prep = prepare_runs(runs)
    settings: dict[str, list[str]] = {}
    noise: dict[str, int] = {}
    old = 0
    for path, summary in _summaries(prep.frame).items():
        record = summary.get("attack_settings")
        if not isinstance(record, Mapping):
            old += 1
            continue
        text = (
            f"attacks {', '.join(record.get('attacks', []))}; PGD {record.get('pgd_steps')} steps × "
            f"{record.get('pgd_restarts')} restarts, step {record.get('pgd_step_size')}·ε/steps; APGD "
            f"{record.get('apgd_steps')} steps × {record.get('apgd_restarts')} restarts; Square "
            f"{record.get('square_queries')} queries; {record.get('images')} of {record.get('test_images')} test "
            f"images ({record.get('subset')}), seed {record.get('seed')}"
        )
        settings.setdefault(text, []).append(Path(path).name)
        draws = int(record.get("eot_draws") or 0)
        label = f"on, EOT over {draws} noise draws per forward" if draws else "off (deterministic model)"
        noise[label] = noise.get(label, 0) + 1
    parts = []
    for text, ids in settings.items():
        parts.append(f"{text} ({len(ids)} run{'s' if len(ids) != 1 else ''})")
    if old:
        parts.append(f"{old} run{'s' if old != 1 else ''} from before the attack suite: the paper's FGSM only")
    noise_text = "; ".join(f"{label} in {n} run{'s' if n != 1 else ''}" for label, n in noise.items())
    return (
        "Attack settings: "
        + (" | ".join(parts) or "none recorded")
        + ". Latent noise during attacks: "
        + (noise_text or "off (deterministic model)")
        + "."
    )


# -- statistics --------------------------------------------------------------------------------------------------


def mean_se(values: Iterable[Any]) -> tuple[float, float, int]:
    """(mean, standard error, n) of the finite values; s.e. = sample std (ddof=1) / √n, NaN when n < 2."""
    x = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").astype(float).to_numpy()
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(x.mean()), se, n


def to_float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # tuples and other containers
        return False


def _plain(value: Any) -> Any:
    """JSON-comparable form: None for missing, lists for tuples, Python scalars for numpy ones."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if is_missing(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


# -- tables ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A numeric column of a table: `column` holds the mean over seeds and `column + '_se'` its s.e."""

    column: str
    label: str
    best: str | None = None  # "max", "min" or "min_abs": the best value of the column is marked; None: not marked
    digits: int = 3
    eps: float | None = None  # robustness columns: the attack radius


@dataclass
class Table:
    """A report table: `frame` holds key columns, n and each metric's mean and s.e. (NaN where missing)."""

    name: str
    title: str
    frame: pd.DataFrame
    keys: list[str]
    metrics: list[Metric] = field(default_factory=list)
    note: str = ""
    best_within: list[str] = field(default_factory=list)  # key columns inside which the best is marked

    @property
    def show_se(self) -> bool:
        """A ± column only when some row averages more than one seed."""
        return "n" in self.frame and bool((pd.to_numeric(self.frame["n"], errors="coerce") > 1).any())


@dataclass
class PreparedRuns:
    """The done runs, one row each, with config.json's values, a `config` id and the key columns to show."""

    frame: pd.DataFrame
    keys: list[str]


def usable_runs(runs: pd.DataFrame) -> pd.Series:
    if runs.empty or "status" not in runs:
        return pd.Series(False, index=runs.index)
    readable = runs["objective"].notna() if "objective" in runs else pd.Series(False, index=runs.index)
    return (runs["status"] == "done") & readable


def prepare_runs(runs: pd.DataFrame) -> PreparedRuns:
    done = runs[usable_runs(runs)].copy()
    if done.empty:
        return PreparedRuns(done.assign(config=pd.Series(dtype=object)), [])
    # The identity comes from config.json itself: final metrics can share a config field's name (the final
    # epoch's "lr" differs from the configured one after a plateau), and load_runs merges them into one row.
    configs = []
    for path in done["path"]:
        try:
            configs.append(results.read_json(Path(path) / results.CONFIG))
        except (OSError, ValueError):
            configs.append({})
    config_frame = pd.DataFrame(configs, index=done.index)
    for name in config_frame.columns:
        if name in CONFIG_FIELDS:
            done[name] = [
                tuple(v) if isinstance(v, list) else (old if is_missing(v) else v)
                for v, old in zip(config_frame[name], done[name] if name in done else [None] * len(done), strict=True)
            ]
    # Fields an objective does not read (β'' and k of a CE run) mean nothing for its runs: "–", not a value.
    for objective, rows in done.groupby("objective"):
        for name in unused_fields_of(objective):
            if name in done:
                done[name] = done[name].astype(object)
                done.loc[rows.index, name] = None
    baseline = done["objective"].map(is_reference).astype(bool)
    if "noise" in done:
        done["noise"] = done["noise"].astype(object)
        for _, rows in done[baseline].groupby("objective"):
            if rows["noise"].map(_plain).nunique(dropna=False) <= 1:
                done.loc[rows.index, "noise"] = None
    identity = [f for f in CONFIG_FIELDS if f in done and f not in NOT_IDENTITY] + ["sweep"]
    done["config"] = [
        json.dumps([_plain(row[f]) for f in identity], default=str) for _, row in done[identity].iterrows()
    ]
    shown = [f for f in ALWAYS_SHOWN if f in done]
    # A field is shown when it takes several values; "–" for the runs whose objective does not read it is no value.
    configs = done.drop_duplicates("config")
    varying = [
        f
        for f in identity
        if f not in shown and len({json.dumps(_plain(v), default=str) for v in configs[f] if not is_missing(v)}) > 1
    ]
    return PreparedRuns(done, shown + varying)


def _sort_value(value: Any) -> tuple:
    if is_missing(value):
        return (0,)
    if isinstance(value, (bool, np.bool_)):
        return (1, -int(value))  # True (e.g. with noise) first
    if isinstance(value, (int, float, np.number)):
        return (1, float(value))
    return (1, str(value))


def _baseline_first(objective: Any) -> tuple:
    return objective_order(objective)


def _aggregate(per_run: list[dict], group: Sequence[str], keys: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """One row per group: keys from its first run, n (runs in the group), mean and s.e. of every value."""
    frame = pd.DataFrame(per_run)
    columns = [*keys, "n", *(c for v in values for c in (v, f"{v}_se"))]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for _, group_frame in frame.groupby(list(group), sort=False):
        first = per_run[group_frame.index[0]]  # the dict keeps ints and None (the frame would make them floats)
        row = {k: first[k] for k in keys}
        row["n"] = len(group_frame)
        for v in values:
            row[v], row[f"{v}_se"], _ = mean_se(group_frame[v])
        rows.append(row)
    out = pd.DataFrame(rows, columns=columns)
    for k in keys:  # object columns: ints stay ints, missing stays None
        out[k] = pd.Series([None if is_missing(r[k]) else r[k] for r in rows], index=out.index, dtype=object)
    return out


def _ordered(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    if frame.empty:
        return frame.reset_index(drop=True)
    order = sorted(
        frame.index,
        key=lambda i: (_baseline_first(frame.at[i, "objective"]),) + tuple(_sort_value(frame.at[i, k]) for k in keys),
    )
    return frame.loc[order].reset_index(drop=True)


def _decoders(frame: pd.DataFrame) -> list[str]:
    names = {c.split("/", 1)[1] for c in frame.columns if c.startswith(("test_acc/", "acc/"))}
    return sorted(names, key=lambda d: (d == HEAD, d))


def accuracy_table(runs: pd.DataFrame) -> Table:
    """Test accuracy per (configuration, decoder): mean ± s.e. over seeds, train accuracy and the gap."""
    prep = prepare_runs(runs)
    per_run = []
    for _, run in prep.frame.iterrows():
        for decoder in _decoders(prep.frame):
            test = to_float(run.get(f"test_acc/{decoder}"))
            if math.isnan(test):
                test = to_float(run.get(f"acc/{decoder}"))
            train = to_float(run.get(f"train_acc/{decoder}"))
            if math.isnan(test) and math.isnan(train):
                continue
            per_run.append(
                {
                    "config": run["config"],
                    **{k: run[k] for k in prep.keys},
                    "decoder": decoder,
                    "test_acc": test,
                    "train_acc": train,
                    "gap": train - test,
                }
            )
    keys = [*prep.keys, "decoder"]
    frame = _ordered(_aggregate(per_run, ["config", "decoder"], keys, ["test_acc", "train_acc", "gap"]), keys)
    return Table(
        name="accuracy",
        title="Accuracy",
        frame=frame,
        keys=keys,
        metrics=[
            Metric("test_acc", "test acc", "max"),
            Metric("train_acc", "train acc"),
            Metric("gap", "train − test", "min_abs"),
        ],
        note=(
            "Accuracy at the final epoch of each decoder fitted on the frozen latents (the baselines' own classifier "
            "is the decoder 'head'); mean over seeds, ± its standard error (sample std / √n), n = seeds. "
            "Bold: best in the column (highest test accuracy, smallest |train − test| gap)."
        ),
    )


def _eps_label(eps: float) -> str:
    """1/255-style labels for the paper's pixel radii, plain numbers otherwise."""
    steps = eps * 255
    # summary.json keys ε with 6 significant digits (8/255 → "0.0313725"), so allow that rounding.
    if eps > 0 and abs(steps - round(steps)) < 1e-4:
        return f"{round(steps)}/255"
    return f"{eps:g}"


def _curve_columns(frame: pd.DataFrame) -> dict[tuple[str, str], dict[float, str]]:
    """(attack, decoder) -> {eps: column} for load_runs' `robust/<attack>/<decoder>/<eps>` columns."""
    curves: dict[tuple[str, str], dict[float, str]] = {}
    for column in frame.columns:
        parts = column.split("/")
        if len(parts) == 4 and parts[0] == "robust":
            curves.setdefault((parts[1], parts[2]), {})[float(parts[3])] = column
    return curves


def _auc(points: Sequence[tuple[float, float]]) -> float:
    """Area under accuracy-vs-ε (trapezoid) over the ε range: the mean accuracy over [ε_min, ε_max]."""
    measured = sorted((eps, acc) for eps, acc in points if not math.isnan(acc))
    if len(measured) < 2:
        return math.nan
    xs, ys = np.array(measured).T
    return float(np.trapezoid(ys, xs) / (xs[-1] - xs[0]))


def _attack_order(attack: str) -> tuple:
    return (ATTACK_ORDER.index(attack) if attack in ATTACK_ORDER else len(ATTACK_ORDER), attack)


def _decoder_order(decoder: Any) -> tuple:
    return (decoder == HEAD, str(decoder))


def _summaries(frame: pd.DataFrame) -> dict[str, dict]:
    """summary.json of each run, keyed by its path (masking diagnostics, attack settings, decoder fits)."""
    return {path: results.read_summary(Path(path)) or {} for path in frame["path"]} if "path" in frame else {}


def attack_table(runs: pd.DataFrame) -> Table:
    """Accuracy under each attack (and the per-image worst case) at each ε, with its AUC, per (config, decoder)."""
    prep = prepare_runs(runs)
    curves = _curve_columns(prep.frame)
    all_eps = sorted({eps for points in curves.values() for eps in points})
    value_names = {eps: f"acc@{eps:.6g}" for eps in all_eps}
    summaries = _summaries(prep.frame)
    per_run = []
    for _, run in prep.frame.iterrows():
        masking = summaries.get(run.get("path"), {}).get("masking") or {}
        for (attack, decoder), points in curves.items():
            values = {value_names[eps]: to_float(run.get(column)) for eps, column in points.items()}
            if all(math.isnan(v) for v in values.values()):
                continue
            blind = (masking.get(decoder) or {}).get("ce_blind") and ATTACK_LOSSES.get(attack) == "ce"
            per_run.append(
                {
                    "config": run["config"],
                    **{k: run[k] for k in prep.keys},
                    "decoder": decoder,
                    "attack": attack,
                    **values,
                    "auc": _auc([(eps, values[value_names[eps]]) for eps in points]),
                    "blind": float(bool(blind)),
                }
            )
    keys = ["attack", *prep.keys, "decoder"]
    values = [*value_names.values(), "auc"]
    frame = _aggregate(per_run, ["config", "decoder", "attack"], keys, [*values, "blind"])
    # "blind" is the share of the configuration's seeds whose CE attacks saw mostly zero gradients.
    frame["note"] = pd.Series(
        [f"CE-blind (zero gradients) in {b:.0%} of seeds" if b > 0 else None for b in frame["blind"]],
        index=frame.index,
        dtype=object,
    )
    frame = frame.drop(columns=["blind", "blind_se"])
    if not frame.empty:
        order = zip(frame["attack"], frame["decoder"], strict=True)
        frame["_order"] = [(_attack_order(a), _decoder_order(d)) for a, d in order]
        frame["_auc"] = -frame["auc"].fillna(-np.inf)
        frame = frame.sort_values(["_order", "_auc"], kind="stable").drop(columns=["_order", "_auc"])
        frame = frame.reset_index(drop=True)
    return Table(
        name="robustness_attacks",
        title="Robustness under each attack",
        frame=frame,
        keys=[*keys, "note"],
        metrics=[Metric(name, f"ε={_eps_label(eps)}", "max", eps=eps) for eps, name in value_names.items()]
        + [Metric("auc", "AUC", "max")],
        note=(
            "Robust accuracy (correct on the clean image and on the attacked one; L∞ radius ε in [0, 1] pixel "
            "units, model in eval mode) under each attack of the suite, and the per-image worst case over them; "
            "mean over seeds ± standard error; AUC as in the robustness table. Attacks: "
            + "; ".join(f"{name} = {ATTACK_LABELS[name]} ({ATTACK_LOSSES[name]} loss)" for name in ATTACK_LOSSES)
            + f". 'CE-blind': more than {100 * CE_BLIND_SHARE:.0f} % of the test images have an exactly zero "
            "cross-entropy input gradient (a saturated softmax), so this cross-entropy attack cannot move them "
            "and its numbers overstate robustness. Old runs without an attack show '–'."
        ),
        best_within=["attack", "decoder"],
    )


def _masking_rows(prep: PreparedRuns) -> list[dict]:
    """One row per (run, decoder) with the diagnostics its summary.json records."""
    rows = []
    summaries = _summaries(prep.frame)
    for _, run in prep.frame.iterrows():
        for decoder, diag in (summaries.get(run.get("path"), {}).get("masking") or {}).items():
            if not isinstance(diag, Mapping):
                continue
            rows.append(
                {
                    "config": run["config"],
                    **{k: run[k] for k in prep.keys},
                    "decoder": decoder,
                    "zero_grad": to_float(diag.get("zero_grad_share")),
                    "square_gap": to_float(diag.get("square_gap")),
                    "worst_max": to_float(diag.get("worst_at_max_eps")),
                    "max_eps": to_float(diag.get("max_eps")),
                    "unreliable": bool(diag.get("unreliable")),
                    "chance_level": bool(diag.get("chance_level")),
                    "reasons": list(diag.get("reasons") or []),
                    "run_id": run["run_id"],
                }
            )
    return rows


def masking_table(runs: pd.DataFrame) -> Table:
    """Gradient-masking diagnostics per (configuration, decoder): the evidence behind 'unreliable'."""
    prep = prepare_runs(runs)
    rows = _masking_rows(prep)
    keys = [*prep.keys, "decoder"]
    values = ["zero_grad", "square_gap", "worst_max", "max_eps"]
    frame = _aggregate(rows, ["config", "decoder"], keys, values)
    verdicts: dict[tuple, list[str]] = {}
    chance: dict[tuple, list[str]] = {}
    for r in rows:
        group = (r["config"], r["decoder"])
        verdicts.setdefault(group, []).extend(f"{r['run_id']}: {reason}" for reason in r["reasons"] if r["unreliable"])
        chance.setdefault(group, []).extend([r["run_id"]] if r["chance_level"] else [])
    groups = list(dict.fromkeys((r["config"], r["decoder"]) for r in rows))

    zero: dict[tuple, float] = {}
    for r in rows:  # the largest zero-gradient share among the group's seeds
        if not math.isnan(r["zero_grad"]):
            group = (r["config"], r["decoder"])
            zero[group] = max(zero.get(group, 0.0), r["zero_grad"])

    def verdict(group: tuple) -> str:
        if verdicts[group]:
            return "unreliable"
        text = f"chance level ({', '.join(chance[group])})" if chance[group] else "ok"
        if zero.get(group, 0.0) > CE_BLIND_SHARE:  # the worst case is sound, but the paper's FGSM column is not
            text += f"; CE attacks blind ({100 * zero[group]:.0f} % zero gradients)"
        return text

    frame["verdict"] = [verdict(g) for g in groups] if rows else pd.Series(dtype=object)
    frame["reasons"] = ["; ".join(verdicts[g]) or None for g in groups] if rows else pd.Series(dtype=object)
    frame = _ordered(frame, keys) if not frame.empty else frame
    return Table(
        name="masking",
        title="Gradient-masking diagnostics",
        frame=frame,
        keys=[*keys, "verdict", "reasons"],
        metrics=[
            Metric("zero_grad", "zero-grad share"),
            Metric("square_gap", "Square gap"),
            Metric("worst_max", "worst @ max ε"),
            Metric("max_eps", "max ε", digits=4),
        ],
        note=(
            "Per (model, decoder), on the attacked test images: the share whose cross-entropy input gradient is "
            "exactly zero (the cross-entropy attacks, the paper's FGSM among them, are blind to those); the "
            "Square gap, the most by which the gradient-free Square attack's accuracy lies below every gradient "
            "attack's at some ε (positive: Square is stronger, a sign of masked gradients); and the worst-case "
            f"accuracy at the largest ε. Unreliable: a Square gap above {SQUARE_GAP:.2f}, or a worst case above "
            f"{100 * BREAK_ACCURACY:.0f} % at ε ≥ {BREAK_EPS:g}, where a working attack leaves a model not trained "
            "adversarially near 0 %. Unreliable worst cases are listed but not ranked in the robustness table. "
            f"Chance level (the runs named): clean accuracy at most {CHANCE_FACTOR:g}× a constant classifier's "
            "(the largest class share), a collapsed model that ignores its input; no attack can flip the class it "
            "always predicts, so its worst case stays near that share without any masking."
        ),
    )


def robustness_table(runs: pd.DataFrame) -> Table:
    """Worst-case accuracy per ε and its AUC per (configuration, decoder), the paper's FGSM AUC beside it; ranked.

    Rows are grouped by decoder family (objectives compared through the same decoder; the baselines' own head is
    its own group) and ranked within it by worst-case AUC. Rows whose worst case looks masked (masking_table's
    verdict) are marked unreliable and left unranked.
    """
    prep = prepare_runs(runs)
    attacks = attack_table(runs).frame
    masking = masking_table(runs).frame
    keys = [*prep.keys, "decoder"]
    eps_columns = [c for c in attacks.columns if c.startswith("acc@") and not c.endswith("_se")]
    rows: dict[str, dict] = {}

    def group(row: pd.Series) -> str:
        return json.dumps([_plain(row[k]) for k in keys], default=str)

    for _, row in attacks.iterrows():
        entry = rows.setdefault(group(row), {**{k: row[k] for k in keys}, "n": row["n"]})
        if row["attack"] == WORST:
            for column in [*eps_columns, "auc"]:
                entry[column], entry[f"{column}_se"] = row[column], row[f"{column}_se"]
        elif row["attack"] == PAPER_ATTACK:
            entry["fgsm_auc"], entry["fgsm_auc_se"] = row["auc"], row["auc_se"]
    for _, row in masking.iterrows():
        if group(row) in rows:
            rows[group(row)].update(zero_grad=row["zero_grad"], zero_grad_se=row["zero_grad_se"])
            rows[group(row)]["check"] = row["verdict"]
    columns = [*keys, "rank", "check", "n"]
    for column in [*eps_columns, "auc", "fgsm_auc", "zero_grad"]:
        columns += [column, f"{column}_se"]
    frame = pd.DataFrame(list(rows.values()), columns=columns)
    for k in [*keys, "check"]:
        frame[k] = frame[k].astype(object).where(frame[k].notna(), None)
    if not frame.empty:
        clean = (frame["check"] != "unreliable") & frame["auc"].notna()
        frame["_decoder"] = frame["decoder"].map(_decoder_order)
        frame["_unranked"] = ~clean
        frame["_auc"] = -frame["auc"].fillna(-np.inf)
        frame["_fgsm"] = -frame["fgsm_auc"].fillna(-np.inf)
        frame = frame.sort_values(["_decoder", "_unranked", "_auc", "_fgsm"], kind="stable")
        ranks = frame[~frame["_unranked"]].groupby("decoder", sort=False).cumcount() + 1
        frame["rank"] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
        frame.loc[ranks.index, "rank"] = [int(r) for r in ranks]
        frame = frame.drop(columns=["_decoder", "_unranked", "_auc", "_fgsm"]).reset_index(drop=True)
    eps_values = sorted(float(c.split("@", 1)[1]) for c in eps_columns)
    return Table(
        name="robustness",
        title="Robustness",
        frame=frame,
        keys=["decoder", "rank", *prep.keys, "check"],
        metrics=[Metric(f"acc@{eps:.6g}", f"ε={_eps_label(eps)}", "max", eps=eps) for eps in eps_values]
        + [
            Metric("auc", "worst AUC", "max"),
            Metric("fgsm_auc", "FGSM AUC (paper)"),
            Metric("zero_grad", "zero-grad share"),
        ],
        note=(
            "Worst-case test accuracy at each L∞ radius ε (pixels in [0, 1]): an image counts as robust only if it "
            "is classified correctly clean and under every attack of the suite (the table 'Robustness under each "
            "attack' lists them), computed per image; mean over seeds ± standard error. Worst AUC: the area "
            "under that curve divided by the ε range. Rows are grouped by decoder, so objectives are compared "
            "through the same decoder family (the baselines' own classifier is the group 'head'), and ranked "
            "within it by worst AUC; bold: best in the column within a decoder. 'FGSM AUC (paper)' is the AUC "
            "under the paper's single-step FGSM on the cross-entropy, kept for reproduction; 'zero-grad share' "
            "is the share of images on which that attack sees no gradient. Check 'unreliable': the worst case "
            "looks masked (see the diagnostics table); such rows are not ranked. '–': not measured (runs from "
            "before the attack suite have only FGSM)."
        ),
        best_within=["decoder"],
    )


INFOPLANE_VALUES = ("final_i_xz", "final_h_y_given_z", "final_h_y_given_z_in_sample", "final_h_z_noise_free",
                    "best_epoch", "best_i_xz", "best_h_y_given_z")  # fmt: skip


def best_epoch_row(rows: pd.DataFrame) -> pd.Series | None:
    """The eval row a run's information plane calls best: the lowest validation H[Y|Z]. None when the run has no
    validation estimate (older runs): a best epoch is never chosen by the test set."""
    if "val_h_y_given_z" not in rows:
        return None
    h = pd.to_numeric(rows["val_h_y_given_z"], errors="coerce")
    return rows.loc[h.idxmin()] if h.notna().any() else None


def infoplane_table(runs: pd.DataFrame, metrics: pd.DataFrame) -> Table:
    """Final and best-epoch (lowest validation H[Y|Z]) I[X;Z] and cross-fitted H[Y|Z] per configuration, with the
    in-sample H[Y|Z] and the noise-free H[Z]; mean ± s.e. over seeds."""
    prep = prepare_runs(runs)
    x, y = "infoplane/i_xz", "infoplane/h_y_given_z"
    per_run = []
    by_run = {}
    if not metrics.empty and "run_id" in metrics:
        by_run = {rid: rows for rid, rows in metrics.groupby("run_id", sort=False)}
    for _, run in prep.frame.iterrows():
        rows = by_run.get(run["run_id"])
        if rows is None or x not in rows or y not in rows:
            continue
        rows = rows.sort_values("epoch")
        final = rows.iloc[-1]
        best = best_epoch_row(rows)
        per_run.append(
            {
                "config": run["config"],
                **{k: run[k] for k in prep.keys},
                "final_i_xz": to_float(final[x]),
                "final_h_y_given_z": to_float(final[y]),
                "final_h_y_given_z_in_sample": to_float(final.get("infoplane/h_y_given_z_in_sample")),
                "final_h_z_noise_free": to_float(final.get("infoplane/h_z_noise_free")),
                "best_epoch": to_float(best["epoch"]) if best is not None else math.nan,
                "best_i_xz": to_float(best[x]) if best is not None else math.nan,
                "best_h_y_given_z": to_float(best[y]) if best is not None else math.nan,
            }
        )
    frame = _ordered(_aggregate(per_run, ["config"], prep.keys, INFOPLANE_VALUES), prep.keys)
    noise_free = not frame.empty and "noise" in frame and (frame["noise"] == False).any()  # noqa: E712
    return Table(
        name="infoplane",
        title="Information plane",
        frame=frame,
        keys=list(prep.keys),
        metrics=[
            Metric("final_i_xz", "final I[X;Z+ε]"),
            Metric("final_h_y_given_z", "final H[Y|Z]"),
            Metric("final_h_y_given_z_in_sample", "final H[Y|Z] in-sample"),
            Metric("final_h_z_noise_free", "final H[Z] noise-free"),
            Metric("best_epoch", "best epoch (val)", digits=1),
            Metric("best_i_xz", "best I[X;Z+ε]"),
            Metric("best_h_y_given_z", "best H[Y|Z]"),
        ],
        note=(
            "On the test set, in nats: I[X;Z+ε] = H[Z+ε] (k-NN estimate of the latents with the zero-entropy noise ε; "
            "I[X;Z] itself for runs trained with that noise) and H[Y|Z] cross-fitted (probes scored on latents they "
            "never saw), with the in-sample H[Y|Z] for comparison with the paper, at the final eval epoch and at the "
            "best one, chosen by the validation split (lowest validation H[Y|Z]); '–' where a run has no validation "
            "estimate. H[Z] noise-free: the k-NN estimate of the deterministic latents themselves"
            + (" (for the runs trained without noise, the value their I[X;Z+ε] stands in for)" if noise_free else "")
            + "; mean over seeds ± standard error."
        ),
    )


def unfinished_table(runs: pd.DataFrame) -> Table:
    """Every run that is not done (failed, incomplete, stopped, unreadable), with the reason; none is dropped."""
    rest = runs[~usable_runs(runs)] if not runs.empty else runs
    rows = []
    for _, run in rest.iterrows():
        status = run.get("status", "?")
        reason = run.get("reason")
        epochs_done = to_float(run.get("epochs_done"))
        epochs = to_float(run.get("epochs"))
        done_text = DASH if math.isnan(epochs_done) else f"{epochs_done:g}"
        if not math.isnan(epochs):
            done_text += f" of {epochs:g}"
        if is_missing(reason):
            reason = {
                "incomplete": (
                    "no DONE file: still training, or killed or interrupted before the end "
                    "(the next sweep resumes it from its checkpoint)"
                ),
                "failed": "failed without a recorded reason",
                "stopped": "stopped early by the search's scheduler",
            }.get(status, f"status {status}")
        elif status == "done":
            status = "unreadable"
        rows.append(
            {
                "run_id": run.get("run_id"),
                "sweep": run.get("sweep"),
                "status": status,
                "objective": run.get("objective"),
                "beta": run.get("beta") if "beta" not in unused_fields_of(run.get("objective")) else None,
                "noise": run.get("noise"),
                "seed": run.get("seed"),
                "epochs_done": done_text,
                "reason": str(reason),
            }
        )
    columns = ["run_id", "sweep", "status", "objective", "beta", "noise", "seed", "epochs_done", "reason"]
    frame = pd.DataFrame(rows, columns=columns)
    for column in columns:
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    frame = frame.sort_values(["status", "run_id"], kind="stable").reset_index(drop=True)
    return Table(
        name="unfinished",
        title="Runs not finished",
        frame=frame,
        keys=columns,
        note="Failed, incomplete and stopped runs: left out of the tables and figures above, listed here with why.",
    )


def fmt_key(column: str, value: Any, objective: Any = None) -> str:
    """A key cell's text; with `objective`, a β is written with its objective's symbol (β''=0.1, β=0.001)."""
    if is_missing(value):
        return DASH
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if column == "objective":
        return objective_label(value)
    if column == "beta" and objective is not None and isinstance(value, (int, float, np.number)):
        return f"{beta_symbol(objective)}={float(value):g}"
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value)
