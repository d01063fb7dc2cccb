"""Tables and figures of a sweep, from its run directories alone (built on results.load_runs / load_metrics).

A *configuration* is every RunConfig field except the seed and the placement fields: the runs of one
configuration differ only in their seed, and the error bars (mean ± standard error, s.e. = sample std / √n)
are computed over those runs only, never across hyperparameters. For the cross-entropy baselines β'' and k mean
nothing, so they are dropped from the configuration and shown as "–" (noise too, unless a baseline is run both
ways). Decoders are a row dimension: one accuracy row per (configuration, decoder).

Every function returns data (`Table`s of DataFrames, matplotlib Figures, strings); only `write_report` writes
files. Figures are built on `matplotlib.figure.Figure` (no pyplot state, no display needed) at fixed sizes.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ibbench import results
from ibbench.config import RunConfig

__all__ = [
    "CAVEAT",
    "DPI",
    "FIGURE_SIZES",
    "Metric",
    "Report",
    "Table",
    "accuracy_table",
    "build_report",
    "figure_generalization",
    "figure_infoplane",
    "figure_robustness",
    "infoplane_table",
    "mean_se",
    "robustness_table",
    "table_html",
    "table_latex",
    "table_markdown",
    "unfinished_table",
    "write_report",
]

DPI = 100
# Inches; at DPI these are the PNGs' pixel sizes (800×500, 1200×500, 800×500). No tight bounding box, so the
# saved size is exactly figsize × DPI.
FIGURE_SIZES = {
    "fig1_robustness": (8.0, 5.0),
    "fig2_infoplane": (12.0, 5.0),
    "fig3_generalization": (8.0, 5.0),
}
BASELINE_OBJECTIVES = ("ce", "ce_dropconnect")
OBJECTIVE_LABELS = {"ib": "IB", "ce": "CE", "ce_dropconnect": "CE+DropConnect"}
IB_ONLY = ("beta", "k")  # meaningless for the baselines; noise is masked too when a baseline runs one way only
NOT_IDENTITY = ("seed", *results.PLACEMENT_FIELDS)
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))
ALWAYS_SHOWN = ("objective", "beta", "noise", "k")
HEAD = "head"  # the decoder name under which the baselines report their own classifier (train.HEAD)
PREFERRED_DECODER = "gmm"  # the paper's decoder for figure 1
DASH = "–"
ATTACK_ORDER = ("fgsm", "pgd")
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
}

CAVEAT = (
    "I[X;Z] = H[Z] comes from the k-nearest-neighbour entropy estimator (Kozachenko–Leonenko / Kraskov et al.) "
    "on the test latents with the zero-entropy noise added. At high latent dimension (d ≥ 64) its absolute "
    "values are biased (10–16 % high in our checks) and not invariant to affine maps of Z, so read them as "
    "relative values: compare runs with the same latent dimension d, sample size N and neighbour rank k, not "
    "absolute nats across settings. H[Y|Z] is the cross-entropy of a ResFC decoder fitted on the test latents, "
    "an upper bound on the true conditional entropy."
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


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def _missing(value: Any) -> bool:
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
    if _missing(value):
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
class _Runs:
    """The done runs, one row each, with config.json's values, a `config` id and the key columns to show."""

    frame: pd.DataFrame
    keys: list[str]


def _usable(runs: pd.DataFrame) -> pd.Series:
    if runs.empty or "status" not in runs:
        return pd.Series(False, index=runs.index)
    readable = runs["objective"].notna() if "objective" in runs else pd.Series(False, index=runs.index)
    return (runs["status"] == "done") & readable


def _prepare(runs: pd.DataFrame) -> _Runs:
    done = runs[_usable(runs)].copy()
    if done.empty:
        return _Runs(done.assign(config=pd.Series(dtype=object)), [])
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
                tuple(v) if isinstance(v, list) else (old if _missing(v) else v)
                for v, old in zip(config_frame[name], done[name] if name in done else [None] * len(done), strict=True)
            ]
    baseline = done["objective"].isin(BASELINE_OBJECTIVES)
    for name in IB_ONLY:
        if name in done:
            done[name] = done[name].astype(object)
            done.loc[baseline, name] = None
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
    varying = [
        f
        for f in identity
        if f not in shown and len({json.dumps(_plain(v), default=str) for v in done.drop_duplicates("config")[f]}) > 1
    ]
    return _Runs(done, shown + varying)


def _sort_value(value: Any) -> tuple:
    if _missing(value):
        return (0,)
    if isinstance(value, (bool, np.bool_)):
        return (1, -int(value))  # True (e.g. with noise) first
    if isinstance(value, (int, float, np.number)):
        return (1, float(value))
    return (1, str(value))


def _baseline_first(objective: Any) -> tuple:
    return (0, BASELINE_OBJECTIVES.index(objective)) if objective in BASELINE_OBJECTIVES else (1, str(objective))


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
        out[k] = pd.Series([None if _missing(r[k]) else r[k] for r in rows], index=out.index, dtype=object)
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
    prep = _prepare(runs)
    per_run = []
    for _, run in prep.frame.iterrows():
        for decoder in _decoders(prep.frame):
            test = _num(run.get(f"test_acc/{decoder}"))
            if math.isnan(test):
                test = _num(run.get(f"acc/{decoder}"))
            train = _num(run.get(f"train_acc/{decoder}"))
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


def robustness_table(runs: pd.DataFrame) -> Table:
    """Accuracy under each attack at each ε and the area under the curve, per (configuration, decoder), ranked."""
    prep = _prepare(runs)
    curves: dict[tuple[str, str], dict[float, str]] = {}  # (attack, decoder) -> {eps: column}
    for column in prep.frame.columns:
        parts = column.split("/")
        if len(parts) == 4 and parts[0] == "robust":
            curves.setdefault((parts[1], parts[2]), {})[float(parts[3])] = column
    all_eps = sorted({eps for points in curves.values() for eps in points})
    value_names = {eps: f"acc@{eps:.6g}" for eps in all_eps}
    per_run = []
    for _, run in prep.frame.iterrows():
        for (attack, decoder), points in curves.items():
            values = {value_names[eps]: _num(run.get(column)) for eps, column in points.items()}
            measured = sorted(
                (eps, values[value_names[eps]]) for eps in points if not math.isnan(values[value_names[eps]])
            )
            if not measured:
                continue
            auc = math.nan
            if len(measured) >= 2:
                xs, ys = np.array(measured).T
                auc = float(np.trapezoid(ys, xs) / (xs[-1] - xs[0]))
            per_run.append(
                {
                    "config": run["config"],
                    **{k: run[k] for k in prep.keys},
                    "decoder": decoder,
                    "attack": attack,
                    **values,
                    "auc": auc,
                }
            )
    keys = ["attack", *prep.keys, "decoder"]
    values = [*value_names.values(), "auc"]
    frame = _aggregate(per_run, ["config", "decoder", "attack"], keys, values)
    if not frame.empty:
        frame["_attack"] = frame["attack"].map(lambda a: (ATTACK_ORDER.index(a) if a in ATTACK_ORDER else 99, a))
        frame["_auc"] = -frame["auc"].fillna(-np.inf)
        frame = frame.sort_values(["_attack", "_auc"], kind="stable").drop(columns=["_attack", "_auc"])
        frame.insert(1, "rank", frame.groupby("attack", sort=False).cumcount() + 1)
        frame = frame.reset_index(drop=True)
    else:
        frame.insert(1, "rank", pd.Series(dtype=int))
    return Table(
        name="robustness",
        title="Robustness",
        frame=frame,
        keys=["attack", "rank", *prep.keys, "decoder"],
        metrics=[Metric(name, f"ε={_eps_label(eps)}", "max", eps=eps) for eps, name in value_names.items()]
        + [Metric("auc", "AUC", "max")],
        note=(
            "Test accuracy under each attack (L∞ radius ε in [0, 1] pixel units, noise off, model in eval mode); "
            "mean over seeds ± standard error. AUC: area under the accuracy-vs-ε curve (trapezoid) divided by the "
            "ε range, i.e. the mean accuracy over [ε_min, ε_max]. Ranked by AUC within each attack; bold: best "
            "in the column for that attack."
        ),
        best_within=["attack"],
    )


INFOPLANE_VALUES = ("final_i_xz", "final_h_y_given_z", "best_epoch", "best_i_xz", "best_h_y_given_z")


def infoplane_table(runs: pd.DataFrame, metrics: pd.DataFrame) -> Table:
    """Final and best-epoch (lowest H[Y|Z]) I[X;Z] and H[Y|Z] per configuration, mean ± s.e. over seeds."""
    prep = _prepare(runs)
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
        h = pd.to_numeric(rows[y], errors="coerce")
        best = rows.loc[h.idxmin()] if h.notna().any() else None
        per_run.append(
            {
                "config": run["config"],
                **{k: run[k] for k in prep.keys},
                "final_i_xz": _num(final[x]),
                "final_h_y_given_z": _num(final[y]),
                "best_epoch": _num(best["epoch"]) if best is not None else math.nan,
                "best_i_xz": _num(best[x]) if best is not None else math.nan,
                "best_h_y_given_z": _num(best[y]) if best is not None else math.nan,
            }
        )
    frame = _ordered(_aggregate(per_run, ["config"], prep.keys, INFOPLANE_VALUES), prep.keys)
    return Table(
        name="infoplane",
        title="Information plane",
        frame=frame,
        keys=list(prep.keys),
        metrics=[
            Metric("final_i_xz", "final I[X;Z]"),
            Metric("final_h_y_given_z", "final H[Y|Z]"),
            Metric("best_epoch", "best epoch", digits=1),
            Metric("best_i_xz", "best I[X;Z]"),
            Metric("best_h_y_given_z", "best H[Y|Z]"),
        ],
        note=(
            "On the test set, in nats: I[X;Z] = H[Z] (k-NN estimate) and H[Y|Z] (ResFC cross-entropy) at the final "
            "eval epoch and at the best one (lowest H[Y|Z]); mean over seeds ± standard error."
        ),
    )


def unfinished_table(runs: pd.DataFrame) -> Table:
    """Every run that is not done (failed, incomplete, stopped, unreadable), with the reason; none is dropped."""
    rest = runs[~_usable(runs)] if not runs.empty else runs
    rows = []
    for _, run in rest.iterrows():
        status = run.get("status", "?")
        reason = run.get("reason")
        epochs_done = _num(run.get("epochs_done"))
        epochs = _num(run.get("epochs"))
        done_text = DASH if math.isnan(epochs_done) else f"{epochs_done:g}"
        if not math.isnan(epochs):
            done_text += f" of {epochs:g}"
        if _missing(reason):
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
                "beta": run.get("beta") if run.get("objective") not in BASELINE_OBJECTIVES else None,
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


# -- formatting --------------------------------------------------------------------------------------------------


def _fmt_key(column: str, value: Any) -> str:
    if _missing(value):
        return DASH
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if column == "objective":
        return OBJECTIVE_LABELS.get(str(value), str(value))
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value)


def _fmt_number(value: Any, digits: int) -> str:
    value = _num(value)
    return DASH if math.isnan(value) else f"{value:.{digits}f}"


def _cells(table: Table) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header labels and rows of (text, bold) cells: keys, n, then each metric and its ± column."""
    frame = table.frame
    show_se = table.show_se
    headers = [KEY_LABELS.get(k, k) for k in table.keys]
    if table.metrics:
        headers.append("n")
    for metric in table.metrics:
        headers += [metric.label] + (["±"] if show_se else [])
    best: dict[str, pd.Series] = {}
    for metric in table.metrics:
        if metric.best is None or metric.column not in frame or frame.empty:
            continue
        values = pd.to_numeric(frame[metric.column], errors="coerce")
        groups = (
            [g.index for _, g in frame.groupby(table.best_within, sort=False)] if table.best_within else [frame.index]
        )
        mask = pd.Series(False, index=frame.index)
        for index in groups:
            chunk = values.loc[index]
            if chunk.notna().sum() < 2:
                continue
            if metric.best == "min_abs":
                chunk = chunk.abs()
            target = chunk.max() if metric.best == "max" else chunk.min()
            mask.loc[index] = np.isclose(chunk, target, rtol=0, atol=1e-12) & chunk.notna()
        best[metric.column] = mask
    rows = []
    for i, row in frame.iterrows():
        cells = [(_fmt_key(k, row[k]), False) for k in table.keys]
        if table.metrics:
            cells.append((_fmt_key("n", row.get("n")), False))
        for metric in table.metrics:
            bold = bool(best[metric.column].loc[i]) if metric.column in best else False
            cells.append((_fmt_number(row.get(metric.column), metric.digits), bold))
            if show_se:
                cells.append((_fmt_number(row.get(f"{metric.column}_se"), metric.digits), False))
        rows.append(cells)
    return headers, rows


def _numeric_columns(table: Table) -> list[bool]:
    flags = [False] * len(table.keys)
    if table.metrics:
        flags.append(True)
    for _ in table.metrics:
        flags += [True] + ([True] if table.show_se else [])
    return flags


def table_markdown(table: Table) -> str:
    """A GitHub-flavoured pipe table; best values in bold, missing values as "–"."""
    headers, rows = _cells(table)
    if not rows:
        return "_(no runs)_"

    def cell(text: str, bold: bool) -> str:
        text = text.replace("|", "\\|")
        return f"**{text}**" if bold and text != DASH else text

    numeric = _numeric_columns(table)
    lines = [
        "| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |",
        "|" + "|".join("---:" if flag else ":---" for flag in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(t, b) for t, b in row) + " |" for row in rows]
    return "\n".join(lines)


def table_html(table: Table) -> str:
    """An HTML <table> (XML-well-formed); best values in <b>."""
    headers, rows = _cells(table)
    if not rows:
        return "<p><em>(no runs)</em></p>"
    numeric = _numeric_columns(table)
    out = [f'<table class="{html.escape(table.name)}">', "<thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for (text, bold), flag in zip(row, numeric, strict=True):
            content = html.escape(text)
            content = f"<b>{content}</b>" if bold and text != DASH else content
            out.append(f'<td class="num">{content}</td>' if flag else f"<td>{content}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_TEX_UNICODE = {
    "β''": r"$\beta''$",
    "±": r"$\pm$",
    "–": "--",
    "−": "$-$",
    "ε": r"$\varepsilon$",
    "|": r"$|$",
    "≥": r"$\geq$",
}


def _tex(text: str) -> str:
    text = "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)
    for plain, tex in _TEX_UNICODE.items():
        text = text.replace(plain, tex)
    return text


def table_latex(table: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); best values in \\textbf."""
    headers, rows = _cells(table)
    numeric = _numeric_columns(table)
    spec = "".join("r" if flag else "l" for flag in numeric)
    lines = [
        f"% ibbench report: {table.title}. {table.note}".replace("\n", " "),
        "% requires \\usepackage{booktabs}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(_tex(h) for h in headers) + r" \\",
        "\\midrule",
    ]
    for row in rows:
        cells = [f"\\textbf{{{_tex(t)}}}" if b and t != DASH else _tex(t) for t, b in row]
        lines.append(" & ".join(cells) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def table_csv(table: Table) -> str:
    """The numbers behind a table (means, s.e., n; empty where missing), one row per table row."""
    frame = table.frame.copy()
    for column in frame.columns:
        if frame[column].map(lambda v: isinstance(v, tuple)).any():
            frame[column] = frame[column].map(lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else v)
    return frame.to_csv(index=False)


# -- figures -----------------------------------------------------------------------------------------------------


def _beta_colors(betas: Iterable[Any]) -> dict[float, tuple]:
    """One colour per β'', evenly spaced on viridis by rank (β'' values often span decades)."""
    values = sorted({float(b) for b in betas if not _missing(b)})
    cmap = colormaps["viridis"]
    positions = np.linspace(0.0, 0.85, len(values)) if len(values) > 1 else [0.35]
    return {b: cmap(p) for b, p in zip(values, positions, strict=True)}


def _style_handles(noise_lines: bool, markers: dict[str, str]) -> list[Line2D]:
    """Legend entries for the line styles (noise solid, no noise dashed) and, when several, the variant markers."""
    handles = []
    if noise_lines:
        handles += [
            Line2D([], [], color="0.5", linestyle="-", label="with noise"),
            Line2D([], [], color="0.5", linestyle="--", label="without noise"),
        ]
    if len(markers) > 1:
        shown = list(markers.items())[: len(MARKERS)]
        handles += [Line2D([], [], color="0.5", marker=m, linestyle="", label=v) for v, m in shown]
    return handles


def _legend_betas(colors: dict[float, tuple], most: int = 8) -> dict[float, tuple]:
    """At most `most` legend entries (evenly spaced by rank, ends included): a search can try dozens of β''."""
    if len(colors) <= most:
        return colors
    items = list(colors.items())
    return dict(items[int(i)] for i in np.unique(np.linspace(0, len(items) - 1, most).round()))


def _beta_axis(ax, betas: Sequence[float]) -> None:
    positive = [b for b in betas if b > 0]
    if len(positive) >= 2 and max(positive) / min(positive) >= 20:
        if len(positive) == len(betas):
            ax.set_xscale("log")
        else:  # β'' = 0 among them: linear up to the smallest positive value, logarithmic above
            ax.set_xscale("symlog", linthresh=min(positive))
            ax.set_xlim(-0.3 * min(positive), max(positive) * 1.5)


def _empty(ax, text: str = "no runs") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _variants(frame: pd.DataFrame, keys: Sequence[str], ignore: Sequence[str]) -> dict[int, str]:
    """Row index -> label of the key values other than `ignore`, when they differ between rows (else '')."""
    rest = [k for k in keys if k not in ignore and len({_fmt_key(k, v) for v in frame[k]}) > 1]
    return {i: ", ".join(f"{KEY_LABELS.get(k, k)}={_fmt_key(k, frame.at[i, k])}" for k in rest) for i in frame.index}


MARKERS = ("o", "^", "s", "D", "v", "P", "X")
BASELINE_STYLE = {
    "ce_dropconnect": {"color": "black", "linestyle": "--", "linewidth": 2.0},
    "ce": {"color": "tab:red", "linestyle": "--", "linewidth": 1.5},
}


def _figure(name: str, **kwargs) -> Figure:
    return Figure(figsize=FIGURE_SIZES[name], dpi=DPI, layout="constrained", **kwargs)


def figure_robustness(runs: pd.DataFrame, table: Table | None = None, attack: str = "fgsm") -> Figure:
    """Fig. 1: accuracy vs ε, one line per β'', noise solid / no noise dashed, baselines black/red dashed."""
    table = table if table is not None else robustness_table(runs)
    fig = _figure("fig1_robustness")
    ax = fig.add_subplot()
    frame = table.frame[table.frame["attack"] == attack] if not table.frame.empty else table.frame
    eps_metrics = [m for m in table.metrics if m.eps is not None]
    xs = np.array([m.eps for m in eps_metrics])
    ib = frame[~frame["objective"].isin(BASELINE_OBJECTIVES)] if not frame.empty else frame
    decoders = sorted(set(ib["decoder"])) if not ib.empty else []
    decoder = PREFERRED_DECODER if PREFERRED_DECODER in decoders else (decoders[0] if decoders else None)
    ib = ib[ib["decoder"] == decoder] if decoder else ib
    colors = _beta_colors(ib["beta"]) if not ib.empty else {}
    variants = _variants(ib, [k for k in table.keys if k not in ("attack", "rank", "decoder")], ("beta", "noise"))
    markers = {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(dict.fromkeys(variants.values()))}

    def draw(row, **style) -> None:
        ys = np.array([_num(row[m.column]) for m in eps_metrics])
        se = np.array([_num(row[f"{m.column}_se"]) for m in eps_metrics])
        ok = ~np.isnan(ys)
        ax.plot(xs[ok], ys[ok], **style)
        band = ok & ~np.isnan(se)
        if band.any():
            ax.fill_between(xs[band], (ys - se)[band], (ys + se)[band], color=style["color"], alpha=0.15, linewidth=0)

    for i, row in ib.iterrows():
        color = colors.get(_num(row["beta"]), "tab:gray")
        marker = markers[variants[i]] if len(markers) > 1 else "o"
        draw(row, color=color, linestyle="-" if row["noise"] is not False else "--", marker=marker, markersize=4)
    handles = [Line2D([], [], color=c, label=f"β''={b:g}") for b, c in _legend_betas(colors).items()]
    handles += _style_handles(not ib.empty, markers)
    for objective in ("ce_dropconnect", "ce"):
        rows = frame[(frame["objective"] == objective) & (frame["decoder"] == HEAD)] if not frame.empty else frame
        for _, row in rows.iterrows():
            draw(row, **BASELINE_STYLE[objective], zorder=3)
        if not rows.empty:
            handles.append(Line2D([], [], **BASELINE_STYLE[objective], label=OBJECTIVE_LABELS[objective]))
    if frame.empty or len(xs) == 0:
        _empty(ax, f"no {attack.upper()} results")
    ax.set_xlabel("FGSM ε (L∞ radius, pixels in [0, 1])" if attack == "fgsm" else f"{attack.upper()} ε")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"Fig. 1: accuracy under {attack.upper()}" + (f" (IB decoder: {decoder})" if decoder else ""))
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


def figure_infoplane(runs: pd.DataFrame, metrics: pd.DataFrame) -> Figure:
    """Fig. 2: per-run trajectories (x = I[X;Z], y = H[Y|Z]) by β'', fading in with epoch; with / without noise."""
    prep = _prepare(runs)
    fig = _figure("fig2_infoplane")
    axes = fig.subplots(1, 2)
    x, y = "infoplane/i_xz", "infoplane/h_y_given_z"
    ib = prep.frame[~prep.frame["objective"].isin(BASELINE_OBJECTIVES)] if not prep.frame.empty else prep.frame
    colors = _beta_colors(ib["beta"]) if not ib.empty else {}
    by_run = {}
    if not metrics.empty and {"run_id", x, y} <= set(metrics.columns):
        by_run = {rid: rows for rid, rows in metrics.groupby("run_id", sort=False)}
    for ax, noise, title in ((axes[0], True, "(a) with zero-entropy noise"), (axes[1], False, "(b) without noise")):
        drawn = 0
        for _, run in ib[ib["noise"] == noise].iterrows() if not ib.empty else []:
            rows = by_run.get(run["run_id"])
            if rows is None:
                continue
            rows = rows.sort_values("epoch")
            points = rows[[x, y]].apply(pd.to_numeric, errors="coerce").dropna().to_numpy()
            if len(points) == 0:
                continue
            rgb = colors.get(_num(run["beta"]), (0.5, 0.5, 0.5, 1.0))[:3]
            alphas = np.linspace(0.15, 1.0, len(points))
            if len(points) >= 2:
                segments = np.stack([points[:-1], points[1:]], axis=1)
                ax.add_collection(LineCollection(segments, colors=[(*rgb, a) for a in alphas[1:]], linewidths=1.5))
            ax.scatter(points[:, 0], points[:, 1], s=12, color=[(*rgb, a) for a in alphas], linewidths=0)
            best = int(np.argmin(points[:, 1]))
            # The square is drawn larger and below, so a final epoch that is also the best shows both marks.
            ax.scatter(*points[best], s=100, marker="s", color=rgb, edgecolors="black", zorder=3)
            ax.scatter(*points[-1], s=60, marker="o", color=rgb, edgecolors="white", linewidths=1.2, zorder=4)
            drawn += 1
        if not drawn:
            _empty(ax)
        ax.autoscale_view()
        ax.set_title(title)
        ax.set_xlabel("I[X;Z] = H[Z]  (nats, k-NN estimate)")
        ax.set_ylabel("H[Y|Z]  (nats, ResFC upper bound)")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, linewidth=2, label=f"β''={b:g}") for b, c in _legend_betas(colors).items()]
    handles += [
        Line2D([], [], marker="o", color="0.6", markeredgecolor="black", linestyle="", markersize=8, label="final"),
        Line2D([], [], marker="s", color="0.6", markeredgecolor="black", linestyle="", markersize=8, label="best"),
        Line2D([], [], color="0.6", alpha=0.25, label="faint: early"),
    ]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    fig.suptitle("Fig. 2: information-plane trajectories on the test set, one per run (best = lowest H[Y|Z])")
    return fig


def figure_generalization(runs: pd.DataFrame, table: Table | None = None) -> Figure:
    """Fig. 3: generalization error (1 − test accuracy) vs β'' per decoder; CE baselines as reference lines."""
    table = table if table is not None else accuracy_table(runs)
    fig = _figure("fig3_generalization")
    ax = fig.add_subplot()
    frame = table.frame
    ib = frame[~frame["objective"].isin(BASELINE_OBJECTIVES)] if not frame.empty else frame
    handles = []
    betas = [float(b) for b in ib["beta"] if not _missing(b)] if not ib.empty else []
    if not ib.empty:
        variants = _variants(ib, table.keys, ("beta", "decoder", "noise"))
        decoder_colors = {d: f"C{i}" for i, d in enumerate(sorted(set(ib["decoder"])))}
        lines = {}
        for i in ib.index:
            lines.setdefault((ib.at[i, "decoder"], variants[i], ib.at[i, "noise"] is not False), []).append(i)
        markers = {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(dict.fromkeys(variants.values()))}
        for (decoder, variant, noisy), index in lines.items():
            rows = ib.loc[index].assign(_beta=lambda f: f["beta"].map(_num)).sort_values("_beta")
            ax.errorbar(
                rows["_beta"],
                1 - rows["test_acc"].astype(float),
                yerr=rows["test_acc_se"].astype(float),  # NaN (a single seed): no bar
                color=decoder_colors[decoder],
                linestyle="-" if noisy else "--",
                marker=markers[variant],
                capsize=3,
                markersize=5,
            )
        handles += [Line2D([], [], color=c, marker="o", label=f"decoder {d}") for d, c in decoder_colors.items()]
        handles += _style_handles(len({k[2] for k in lines}) > 1, markers)
    for objective in ("ce", "ce_dropconnect"):
        rows = frame[(frame["objective"] == objective) & (frame["decoder"] == HEAD)] if not frame.empty else frame
        style = BASELINE_STYLE[objective] | {"linestyle": "--" if objective == "ce" else ":"}
        for _, row in rows.iterrows():
            error, se = 1 - _num(row["test_acc"]), _num(row["test_acc_se"])
            ax.axhline(error, **style)
            if not math.isnan(se):
                ax.axhspan(error - se, error + se, color=style["color"], alpha=0.1, linewidth=0)
        if not rows.empty:
            handles.append(Line2D([], [], **style, label=f"{OBJECTIVE_LABELS[objective]} (own classifier)"))
    if betas:
        _beta_axis(ax, betas)
    else:
        _empty(ax)
    ax.set_xlabel("β''")
    ax.set_ylabel("generalization error (1 − test accuracy)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title("Fig. 3: generalization error vs β''")
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


# -- the report --------------------------------------------------------------------------------------------------

FIGURE_CAPTIONS = {
    "fig1_robustness": (
        "Figure 1: test accuracy under FGSM at each ε, one line per β'' (colour; IB with the GMM decoder where it was "
        "fitted); solid with the zero-entropy noise, dashed without; the baselines with their own classifier: "
        "CE+DropConnect black dashed, CE red dashed; shaded bands ± s.e. over seeds."
    ),
    "fig2_infoplane": (
        "Figure 2: information-plane trajectories on the test set (x = I[X;Z], y = H[Y|Z]), coloured by β'', "
        "fainter at early epochs; circle: final epoch, square: best epoch (lowest H[Y|Z]). Left with the noise, "
        "right without. IB runs only; the baselines' values are in the table."
    ),
    "fig3_generalization": (
        "Figure 3: generalization error (1 − test accuracy) vs β'' for each decoder (solid with noise, dashed "
        "without), error bars ± s.e.; the CE baseline's own classifier as the red dashed reference line."
    ),
}


@dataclass
class Report:
    """Everything a report shows, before it is written."""

    root: Path
    runs: pd.DataFrame
    tables: dict[str, Table]
    unfinished: Table
    figures: dict[str, Figure]

    def blocks(self) -> list[tuple[str, Any]]:
        """The document as (kind, content) blocks, rendered to Markdown and HTML alike."""
        runs = self.runs
        total = len(runs)
        states = runs["status"].value_counts().to_dict() if total else {}
        state_text = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"
        sweeps = sorted(runs["sweep"].dropna().unique()) if total else []
        accuracy = self.tables["accuracy"].frame
        seeds = sorted({int(s) for s in runs.loc[_usable(runs), "seed"].dropna()}) if total else []
        intro = (
            f"{total} runs below {self.root} (sweep{'s' if len(sweeps) != 1 else ''}: {', '.join(sweeps) or '–'}): "
            f"{state_text}. Tables and figures use the done runs; every number is a mean over the seeds of one "
            f"configuration (seeds {', '.join(map(str, seeds)) or '–'}) with its standard error (sample std / √n); "
            f"'–' marks a value that was not measured."
        )
        out: list[tuple[str, Any]] = [("h1", f"ibbench report: {self.root.name or self.root}"), ("p", intro)]
        if not accuracy.empty and not self.tables["accuracy"].show_se:
            out.append(("p", "Every configuration has a single seed: no standard errors can be given."))
        out += [("h2", "Caveat: the entropy estimates"), ("p", CAVEAT)]
        sections = [
            ("accuracy", "fig3_generalization"),
            ("robustness", "fig1_robustness"),
            ("infoplane", "fig2_infoplane"),
        ]
        for name, figure in sections:
            table = self.tables[name]
            out += [("h2", table.title), ("p", table.note), ("table", table), ("figure", figure)]
        out += [("h2", self.unfinished.title)]
        if self.unfinished.frame.empty:
            out.append(("p", f"None: all {total} runs finished."))
        else:
            out += [("p", self.unfinished.note), ("table", self.unfinished)]
        return out


def build_report(root: Path | str) -> Report:
    """Load the runs below root and compute every table and figure."""
    root = Path(root)
    runs = results.load_runs(root)
    metrics = results.load_metrics(root)
    tables = {
        "accuracy": accuracy_table(runs),
        "robustness": robustness_table(runs),
        "infoplane": infoplane_table(runs, metrics),
    }
    figures = {
        "fig1_robustness": figure_robustness(runs, tables["robustness"]),
        "fig2_infoplane": figure_infoplane(runs, metrics),
        "fig3_generalization": figure_generalization(runs, tables["accuracy"]),
    }
    return Report(root, runs, tables, unfinished_table(runs), figures)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1250px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0 1.2em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { border-bottom: 2px solid #888; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; }
.caveat { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 1em; }
"""


def _markdown(report: Report) -> str:
    parts = []
    for kind, content in report.blocks():
        if kind == "h1":
            parts.append(f"# {content}")
        elif kind == "h2":
            parts.append(f"## {content}")
        elif kind == "p":
            parts.append(content)
        elif kind == "table":
            parts.append(table_markdown(content))
            parts.append(f"Files: [{content.name}.csv]({content.name}.csv), [{content.name}.tex]({content.name}.tex)")
        elif kind == "figure":
            parts.append(f"![{FIGURE_CAPTIONS[content].split(':')[0]}]({content}.png)")
            parts.append(f"*{FIGURE_CAPTIONS[content]}* ([PDF]({content}.pdf))")
    return "\n\n".join(parts) + "\n"


def _html(report: Report, pngs: dict[str, bytes]) -> str:
    title = f"ibbench report: {report.root.name or report.root}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"/>',
        f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head><body>",
    ]
    after_caveat = False
    for kind, content in report.blocks():
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(content)}</{kind}>")
            after_caveat = content.startswith("Caveat")
        elif kind == "p":
            css = ' class="caveat"' if after_caveat else ""
            parts.append(f"<p{css}>{html.escape(content)}</p>")
        elif kind == "table":
            parts.append(table_html(content))
        elif kind == "figure":
            data = base64.b64encode(pngs[content]).decode("ascii")
            caption = FIGURE_CAPTIONS[content]
            parts.append(
                f'<figure id="{content}"><img alt="{html.escape(caption.split(":")[0])}" '
                f'src="data:image/png;base64,{data}"/><figcaption>{html.escape(caption)}</figcaption></figure>'
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(root: Path | str, out_dir: Path | str) -> list[Path]:
    """Write report.md, report.html, each table as .csv and .tex, each figure as .png and .pdf; return the paths."""
    report = build_report(root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def put(name: str, data: str | bytes) -> None:
        path = out / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        written.append(path)

    for table in [*report.tables.values(), report.unfinished]:
        put(f"{table.name}.csv", table_csv(table))
        put(f"{table.name}.tex", table_latex(table))
    pngs = {}
    for name, fig in report.figures.items():
        pngs[name] = _png(fig)
        put(f"{name}.png", pngs[name])
        pdf = io.BytesIO()
        fig.savefig(pdf, format="pdf", dpi=DPI, metadata={"CreationDate": None})
        put(f"{name}.pdf", pdf.getvalue())
    put("report.md", _markdown(report))
    put("report.html", _html(report, pngs))
    return written
