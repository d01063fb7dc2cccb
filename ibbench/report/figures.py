"""Report figures (the paper's figs. 1–3) from the tables and per-epoch metrics: matplotlib Figures built on
`matplotlib.figure.Figure` (no pyplot state, no display needed) at fixed sizes; nothing is written here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ibbench.attacks import ATTACK_LABELS, PAPER_ATTACK, WORST
from ibbench.report.tables import (
    BASELINE_OBJECTIVES,
    HEAD,
    KEY_LABELS,
    OBJECTIVE_LABELS,
    Table,
    accuracy_table,
    attack_table,
    fmt_key,
    is_missing,
    masking_table,
    prepare_runs,
    to_float,
)

DPI = 100
# Inches; at DPI these are the PNGs' pixel sizes (800×500, 1200×500, 800×500). No tight bounding box, so the
# saved size is exactly figsize × DPI.
FIGURE_SIZES = {
    "fig1_robustness": (8.0, 5.0),
    "fig2_infoplane": (12.0, 5.0),
    "fig3_generalization": (8.0, 5.0),
}


def _beta_colors(betas: Iterable[Any]) -> dict[float, tuple]:
    """One colour per β'', evenly spaced on viridis by rank (β'' values often span decades)."""
    values = sorted({float(b) for b in betas if not is_missing(b)})
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
    rest = [k for k in keys if k not in ignore and len({fmt_key(k, v) for v in frame[k]}) > 1]
    return {i: ", ".join(f"{KEY_LABELS.get(k, k)}={fmt_key(k, frame.at[i, k])}" for k in rest) for i in frame.index}


MARKERS = ("o", "^", "s", "D", "v", "P", "X")
BASELINE_STYLE = {
    "ce_dropconnect": {"color": "black", "linestyle": "--", "linewidth": 2.0},
    "ce": {"color": "tab:red", "linestyle": "--", "linewidth": 1.5},
}


def _figure(name: str, **kwargs) -> Figure:
    return Figure(figsize=FIGURE_SIZES[name], dpi=DPI, layout="constrained", **kwargs)


def figure_robustness(runs: pd.DataFrame, table: Table | None = None, attack: str | None = None) -> Figure:
    """Fig. 1: accuracy vs ε under the per-image worst case, one panel per decoder family, like for like.

    In each panel: IB, one line per β'' (noise solid / no noise dashed), and the baselines through the same
    decoder (CE red, CE+DropConnect black, dashed); the baselines' own classifier is an extra dotted line in
    every panel. `table` is attack_table(runs); `attack` defaults to "worst", or the paper's FGSM for runs from
    before the suite. Unreliable worst cases (masking_table) are drawn faint with × markers.
    """
    table = table if table is not None else attack_table(runs)
    fig = _figure("fig1_robustness")
    frame = table.frame
    if attack is None:
        attack = WORST if not frame.empty and (frame["attack"] == WORST).any() else PAPER_ATTACK
    frame = frame[frame["attack"] == attack] if not frame.empty else frame
    eps_metrics = [m for m in table.metrics if m.eps is not None]
    xs = np.array([m.eps for m in eps_metrics])
    masking = masking_table(runs).frame
    keys = [k for k in table.keys if k not in ("attack", "rank", "decoder", "note")]
    unreliable = set()
    if not masking.empty:
        for _, row in masking[masking["verdict"] == "unreliable"].iterrows():
            unreliable.add(json.dumps([str(row[k]) for k in [*keys, "decoder"]]))
    ib_all = frame[~frame["objective"].isin(BASELINE_OBJECTIVES)] if not frame.empty else frame
    families = sorted(set(frame["decoder"]) - {HEAD}) if not frame.empty else []
    families = families or [None]
    axes = fig.subplots(1, len(families), sharey=True, squeeze=False)[0]
    colors = _beta_colors(ib_all["beta"]) if not ib_all.empty else {}
    handles: list[Line2D] = []

    def draw(ax, row, **style) -> None:
        ys = np.array([to_float(row[m.column]) for m in eps_metrics])
        se = np.array([to_float(row[f"{m.column}_se"]) for m in eps_metrics])
        ok = ~np.isnan(ys)
        if json.dumps([str(row[k]) for k in [*keys, "decoder"]]) in unreliable:
            style = {**style, "alpha": 0.35, "marker": "x"}
        ax.plot(xs[ok], ys[ok], **style)
        band = ok & ~np.isnan(se)
        if band.any():
            ax.fill_between(xs[band], (ys - se)[band], (ys + se)[band], color=style["color"], alpha=0.15, linewidth=0)

    markers: dict[str, str] = {}
    for ax, decoder in zip(axes, families, strict=True):
        ib = ib_all[ib_all["decoder"] == decoder] if decoder is not None and not ib_all.empty else ib_all.iloc[0:0]
        variants = _variants(ib, keys, ("beta", "noise")) if not ib.empty else {}
        for v in dict.fromkeys(variants.values()):
            markers.setdefault(v, MARKERS[len(markers) % len(MARKERS)])
        for i, row in ib.iterrows():
            color = colors.get(to_float(row["beta"]), "tab:gray")
            marker = markers[variants[i]] if len(markers) > 1 else "o"
            linestyle = "-" if row["noise"] is not False else "--"
            draw(ax, row, color=color, linestyle=linestyle, marker=marker, markersize=4)
        for objective in ("ce_dropconnect", "ce"):
            for own, style in (
                (decoder, BASELINE_STYLE[objective]),
                (HEAD, {**BASELINE_STYLE[objective], "linestyle": ":"}),
            ):
                if frame.empty or own is None:
                    continue
                for _, row in frame[(frame["objective"] == objective) & (frame["decoder"] == own)].iterrows():
                    draw(ax, row, **style, zorder=3)
        if frame.empty or len(xs) == 0:
            _empty(ax, f"no {ATTACK_LABELS.get(attack, attack)} results")
        ax.set_title(f"decoder {decoder}" if decoder is not None else "")
        ax.set_xlabel("ε (L∞ radius, pixels in [0, 1])")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy, {ATTACK_LABELS.get(attack, attack)}")
    handles += [Line2D([], [], color=c, label=f"β''={b:g}") for b, c in _legend_betas(colors).items()]
    handles += _style_handles(not ib_all.empty, markers)
    for objective in ("ce_dropconnect", "ce"):
        if not frame.empty and (frame["objective"] == objective).any():
            label = OBJECTIVE_LABELS[objective]
            handles.append(Line2D([], [], **BASELINE_STYLE[objective], label=f"{label}, same decoder"))
            if ((frame["objective"] == objective) & (frame["decoder"] == HEAD)).any():
                head_style = {**BASELINE_STYLE[objective], "linestyle": ":"}
                handles.append(Line2D([], [], **head_style, label=f"{label}, own classifier"))
    if unreliable:
        handles.append(Line2D([], [], color="0.5", marker="x", alpha=0.35, label="unreliable (masked)"))
    fig.suptitle(f"Fig. 1: {'per-image worst case over the attacks' if attack == WORST else ATTACK_LABELS[attack]}")
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


def figure_infoplane(runs: pd.DataFrame, metrics: pd.DataFrame) -> Figure:
    """Fig. 2: per-run trajectories (x = I[X;Z], y = H[Y|Z]) by β'', fading in with epoch; with / without noise."""
    prep = prepare_runs(runs)
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
            rgb = colors.get(to_float(run["beta"]), (0.5, 0.5, 0.5, 1.0))[:3]
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
    betas = [float(b) for b in ib["beta"] if not is_missing(b)] if not ib.empty else []
    if not ib.empty:
        variants = _variants(ib, table.keys, ("beta", "decoder", "noise"))
        decoder_colors = {d: f"C{i}" for i, d in enumerate(sorted(set(ib["decoder"])))}
        lines = {}
        for i in ib.index:
            lines.setdefault((ib.at[i, "decoder"], variants[i], ib.at[i, "noise"] is not False), []).append(i)
        markers = {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(dict.fromkeys(variants.values()))}
        for (decoder, variant, noisy), index in lines.items():
            rows = ib.loc[index].assign(_beta=lambda f: f["beta"].map(to_float)).sort_values("_beta")
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
            error, se = 1 - to_float(row["test_acc"]), to_float(row["test_acc_se"])
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


FIGURE_CAPTIONS = {
    "fig1_robustness": (
        "Figure 1: test accuracy at each ε under the per-image worst case over the attack suite (the paper's FGSM "
        "for runs from before the suite), one panel per decoder family, so IB and the baselines are compared "
        "through the same decoder: IB one line per β'' (colour; solid with the zero-entropy noise, dashed "
        "without), CE red dashed and CE+DropConnect black dashed through that decoder, and dotted through their "
        "own classifier (an extra line, the same in every panel); faint × lines: worst cases marked unreliable; "
        "shaded bands ± s.e. over seeds."
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
