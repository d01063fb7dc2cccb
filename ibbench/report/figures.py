"""Report figures (the paper's figs. 1–3) from the tables and per-epoch metrics: matplotlib Figures built on
`matplotlib.figure.Figure` (no pyplot state, no display needed) at fixed sizes; nothing is written here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ibbench.attacks import ATTACK_LABELS, PAPER_ATTACK, WORST
from ibbench.report.tables import (
    HEAD,
    KEY_LABELS,
    Table,
    accuracy_table,
    attack_table,
    best_epoch_row,
    beta_symbol,
    fmt_key,
    is_missing,
    is_reference,
    masking_table,
    objective_label,
    objective_noise_default,
    objective_order,
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


# One colour map per objective with a β (the first, ib in the paper's figures, keeps viridis), one colour per β
# within it; objectives without a β are reference lines.
OBJECTIVE_CMAPS = ("viridis", "Oranges", "Blues", "PuRd", "Greens")
MARKERS = ("o", "^", "s", "D", "v", "P", "X")
REFERENCE_STYLES = {
    "ce_dropconnect": {"color": "black", "linestyle": "--", "linewidth": 2.0},
    "ce": {"color": "tab:red", "linestyle": "--", "linewidth": 1.5},
}


def _references(frame: pd.DataFrame) -> list[str]:
    """The objectives without a β among the frame's rows (the CE baselines)."""
    if frame.empty or "objective" not in frame:
        return []
    return sorted({o for o in frame["objective"] if is_reference(o)}, key=objective_order)


def _reference_style(objective: Any) -> dict[str, Any]:
    return REFERENCE_STYLES.get(str(objective), {"color": "tab:brown", "linestyle": "-.", "linewidth": 1.5})


def _beta_objectives(frame: pd.DataFrame) -> list[str]:
    """The objectives with a β among the frame's rows, ib first."""
    if frame.empty or "objective" not in frame:
        return []
    return sorted({o for o in frame["objective"] if not is_reference(o)}, key=objective_order)


def _palette(frame: pd.DataFrame) -> dict[tuple[str, float], tuple]:
    """(objective, β) -> colour: each objective its colour map, its βs evenly spaced on it by rank (β values often
    span decades)."""
    colors: dict[tuple[str, float], tuple] = {}
    for i, objective in enumerate(_beta_objectives(frame)):
        rows = frame[frame["objective"] == objective]
        values = sorted({float(b) for b in rows["beta"] if not is_missing(b)})
        name = OBJECTIVE_CMAPS[i % len(OBJECTIVE_CMAPS)]
        low, high = (0.0, 0.85) if name == "viridis" else (0.4, 0.95)  # sequential maps fade to white at 0
        positions = np.linspace(low, high, len(values)) if len(values) > 1 else [(low + high) / 2]
        colors.update({(objective, b): colormaps[name](pos) for b, pos in zip(values, positions, strict=True)})
    return colors


def _marker(objective: Any, frame: pd.DataFrame) -> str:
    objectives = _beta_objectives(frame)
    return MARKERS[objectives.index(objective) % len(MARKERS)] if objective in objectives else "o"


def _color(palette: dict, row: pd.Series) -> tuple:
    return palette.get((row["objective"], to_float(row["beta"])), (0.5, 0.5, 0.5, 1.0))


def _dashed(row: pd.Series) -> bool:
    """Dashed: an objective trained without the noise it has by default (ib without noise)."""
    return row.get("noise") is False and objective_noise_default(row["objective"])


def _palette_handles(palette: dict, frame: pd.DataFrame, most: int = 8) -> list[Line2D]:
    """Legend entries for the palette: at most `most` βs per objective (evenly spaced by rank, ends included)."""
    handles = []
    for objective in _beta_objectives(frame):
        items = [(b, c) for (o, b), c in palette.items() if o == objective]
        if len(items) > most:
            items = [items[int(i)] for i in np.unique(np.linspace(0, len(items) - 1, most).round())]
        marker = _marker(objective, frame) if len(_beta_objectives(frame)) > 1 else None
        handles += [Line2D([], [], color=c, marker=marker, label=f"{objective_label(objective)} "
                           f"{beta_symbol(objective)}={b:g}") for b, c in items]  # fmt: skip
    return handles


def _style_handles(dashed_lines: bool, markers: dict[str, str]) -> list[Line2D]:
    """Legend entries for the line styles (noise solid, no noise dashed) and, when several, the variant markers."""
    handles = []
    if dashed_lines:
        handles += [
            Line2D([], [], color="0.5", linestyle="-", label="with its noise"),
            Line2D([], [], color="0.5", linestyle="--", label="without noise"),
        ]
    if len(markers) > 1:
        shown = list(markers.items())[: len(MARKERS)]
        handles += [Line2D([], [], color="0.5", marker=m, linestyle="", label=v) for v, m in shown]
    return handles


def _beta_axis(ax, betas: Sequence[float]) -> None:
    positive = [b for b in betas if b > 0]
    if len(positive) >= 2 and max(positive) / min(positive) >= 20:
        if len(positive) == len(betas):
            ax.set_xscale("log")
        else:  # β = 0 among them: linear up to the smallest positive value, logarithmic above
            ax.set_xscale("symlog", linthresh=min(positive))
            ax.set_xlim(-0.3 * min(positive), max(positive) * 1.5)


def _empty(ax, text: str = "no runs") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _variants(frame: pd.DataFrame, keys: Sequence[str], ignore: Sequence[str]) -> dict[int, str]:
    """Row index -> label of the key values other than `ignore`, when they differ between rows (else '')."""
    # A key varies when it takes several values; "–" (a field the row's objective does not read) is no value.
    rest = [k for k in keys if k not in ignore and len({fmt_key(k, v) for v in frame[k] if not is_missing(v)}) > 1]
    return {i: ", ".join(f"{KEY_LABELS.get(k, k)}={fmt_key(k, frame.at[i, k])}" for k in rest) for i in frame.index}


def _figure(name: str, **kwargs) -> Figure:
    return Figure(figsize=FIGURE_SIZES[name], dpi=DPI, layout="constrained", **kwargs)


def figure_robustness(runs: pd.DataFrame, table: Table | None = None, attack: str | None = None) -> Figure:
    """Fig. 1: accuracy vs ε under the per-image worst case, one panel per decoder family, like for like.

    In each panel: every objective with a β, one line per β (a colour map per objective; ib without its noise
    dashed), and the reference objectives through the same decoder (CE red, CE+DropConnect black, dashed); their
    own classifier is an extra dotted line in every panel. `table` is attack_table(runs); `attack` defaults to
    "worst", or the paper's FGSM for runs from before the suite. Unreliable worst cases (masking_table) are drawn
    faint with × markers.
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
    ib_all = frame[~frame["objective"].map(is_reference).astype(bool)] if not frame.empty else frame
    references = _references(frame)
    families = sorted(set(frame["decoder"]) - {HEAD}) if not frame.empty else []
    families = families or [None]
    axes = fig.subplots(1, len(families), sharey=True, squeeze=False)[0]
    palette = _palette(ib_all)
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
        variants = _variants(ib, keys, ("objective", "beta", "noise")) if not ib.empty else {}
        for v in dict.fromkeys(variants.values()):
            markers.setdefault(v, MARKERS[len(markers) % len(MARKERS)])
        for i, row in ib.iterrows():
            marker = markers[variants[i]] if len(markers) > 1 else _marker(row["objective"], ib_all)
            linestyle = "--" if _dashed(row) else "-"
            draw(ax, row, color=_color(palette, row), linestyle=linestyle, marker=marker, markersize=4)
        for objective in references:
            for own, style in (
                (decoder, _reference_style(objective)),
                (HEAD, {**_reference_style(objective), "linestyle": ":"}),
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
    handles += _palette_handles(palette, ib_all)
    handles += _style_handles(not ib_all.empty and any(_dashed(r) for _, r in ib_all.iterrows()), markers)
    for objective in references:
        label = objective_label(objective)
        handles.append(Line2D([], [], **_reference_style(objective), label=f"{label}, same decoder"))
        if ((frame["objective"] == objective) & (frame["decoder"] == HEAD)).any():
            head_style = {**_reference_style(objective), "linestyle": ":"}
            handles.append(Line2D([], [], **head_style, label=f"{label}, own classifier"))
    if unreliable:
        handles.append(Line2D([], [], color="0.5", marker="x", alpha=0.35, label="unreliable (masked)"))
    fig.suptitle(f"Fig. 1: {'per-image worst case over the attacks' if attack == WORST else ATTACK_LABELS[attack]}",
                 x=0.01, ha="left")  # fmt: skip
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


def _infoplane_groups(frame: pd.DataFrame) -> list[tuple[str, Any, str]]:
    """Fig. 2's panels: (objective, noise, title) for each objective with a β (ib with and without its noise
    apart), then one panel for the reference objectives (objective "" and noise None)."""
    groups = []
    for objective in _beta_objectives(frame):
        rows = frame[frame["objective"] == objective]
        label = objective_label(objective)
        if objective_noise_default(objective):
            for noise in (True, False):
                if (rows["noise"] == noise).any():
                    title = f"{label} with zero-entropy noise" if noise else f"{label} without noise: x = I[X;Z+ε]"
                    groups.append((objective, noise, title))
        else:
            groups.append((objective, None, label))
    if any(is_reference(o) for o in frame["objective"]):
        groups.append(("", None, "references (no β)"))
    return groups


def figure_infoplane(runs: pd.DataFrame, metrics: pd.DataFrame) -> Figure:
    """Fig. 2: per-run trajectories (x = I[X;Z+ε], y = cross-fitted H[Y|Z]), fading in with epoch; one panel per
    objective (ib with and without its noise), coloured by β; each objective's own bound on I(X;Z) dashed."""
    prep = prepare_runs(runs)
    fig = _figure("fig2_infoplane")
    x, y, own = "infoplane/i_xz", "infoplane/h_y_given_z", "train/i_xz_bound"
    frame = prep.frame
    groups = _infoplane_groups(frame) if not frame.empty else []
    axes = fig.subplots(1, max(1, len(groups)), squeeze=False)[0]
    palette = _palette(frame[~frame["objective"].map(is_reference).astype(bool)]) if not frame.empty else {}
    by_run = {}
    if not metrics.empty and {"run_id", x, y} <= set(metrics.columns):
        by_run = {rid: rows for rid, rows in metrics.groupby("run_id", sort=False)}
    bounds_drawn = False
    for ax, (objective, noise, title) in zip(axes, groups or [("", None, "")], strict=True):
        if objective:
            members = frame[frame["objective"] == objective]
            members = members if noise is None else members[members["noise"] == noise]
        else:
            members = frame[frame["objective"].map(is_reference).astype(bool)] if not frame.empty else frame
        drawn = 0
        for _, run in members.iterrows():
            rows = by_run.get(run["run_id"])
            if rows is None:
                continue
            rows = rows.sort_values("epoch")
            points = rows[[x, y]].apply(pd.to_numeric, errors="coerce").dropna().to_numpy()
            if len(points) == 0:
                continue
            rgb = _color(palette, run) if objective else mcolors.to_rgba(_reference_style(run["objective"])["color"])
            rgb = rgb[:3]
            alphas = np.linspace(0.15, 1.0, len(points))
            if len(points) >= 2:
                segments = np.stack([points[:-1], points[1:]], axis=1)
                ax.add_collection(LineCollection(segments, colors=[(*rgb, a) for a in alphas[1:]], linewidths=1.5))
            ax.scatter(points[:, 0], points[:, 1], s=12, color=[(*rgb, a) for a in alphas], linewidths=0)
            best = best_epoch_row(rows)
            if best is not None and math.isfinite(to_float(best[x])) and math.isfinite(to_float(best[y])):
                # The square is drawn larger and below, so a final epoch that is also the best shows both marks.
                ax.scatter(to_float(best[x]), to_float(best[y]), s=100, marker="s", color=rgb, edgecolors="black",
                           zorder=3)  # fmt: skip
            ax.scatter(*points[-1], s=60, marker="o", color=rgb, edgecolors="white", linewidths=1.2, zorder=4)
            if own in rows:  # the objective's own bound on I(X;Z) (VIB's KL, nlib's KDE bound), same H[Y|Z]
                bound = rows[[own, y]].apply(pd.to_numeric, errors="coerce").dropna().to_numpy()
                if len(bound):
                    ax.plot(bound[:, 0], bound[:, 1], color=rgb, linestyle="--", linewidth=1, alpha=0.6)
                    bounds_drawn = True
            drawn += 1
        if not drawn:
            _empty(ax)
        ax.autoscale_view()
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("I[X;Z+ε]  (nats, k-NN estimate)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("H[Y|Z]  (nats, cross-fitted ResFC)")
    handles = _palette_handles(palette, frame[~frame["objective"].map(is_reference).astype(bool)]) if palette else []
    references = _references(frame)
    handles += [Line2D([], [], color=_reference_style(o)["color"], label=objective_label(o)) for o in references]
    handles += [
        Line2D([], [], marker="o", color="0.6", markeredgecolor="black", linestyle="", markersize=8, label="final"),
        Line2D([], [], marker="s", color="0.6", markeredgecolor="black", linestyle="", markersize=8,
               label="best (validation)"),
        Line2D([], [], color="0.6", alpha=0.25, label="faint: early"),
    ]  # fmt: skip
    if bounds_drawn:
        handles.append(Line2D([], [], color="0.4", linestyle="--", label="x = the objective's own bound"))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    fig.suptitle("Fig. 2: information-plane trajectories on the test set, one per run", x=0.01, ha="left")
    return fig


def figure_generalization(runs: pd.DataFrame, table: Table | None = None) -> Figure:
    """Fig. 3: generalization error (1 − test accuracy) vs β, one panel per objective with a β, a line per decoder;
    the reference objectives' own classifiers as horizontal lines in every panel."""
    table = table if table is not None else accuracy_table(runs)
    fig = _figure("fig3_generalization")
    frame = table.frame
    objectives = _beta_objectives(frame)
    axes = fig.subplots(1, max(1, len(objectives)), sharey=True, squeeze=False)[0]
    handles = []
    families = sorted(set(frame["decoder"]) - {HEAD}) if not frame.empty else []
    decoder_colors = {d: f"C{i}" for i, d in enumerate(families)}
    markers: dict[str, str] = {}
    dashed_any = False
    tops: list[float] = []  # every plotted value, for one y range all panels share
    references = _references(frame)
    for ax, objective in zip(axes, objectives or [None], strict=True):
        rows_all = frame[frame["objective"] == objective] if objective is not None else frame.iloc[0:0]
        betas = [float(b) for b in rows_all["beta"] if not is_missing(b)]
        if not rows_all.empty:
            variants = _variants(rows_all, table.keys, ("objective", "beta", "decoder", "noise"))
            lines: dict[tuple, list] = {}
            for i in rows_all.index:
                dashed = _dashed(rows_all.loc[i])
                dashed_any |= dashed
                lines.setdefault((rows_all.at[i, "decoder"], variants[i], dashed), []).append(i)
            for v in dict.fromkeys(variants.values()):
                markers.setdefault(v, MARKERS[len(markers) % len(MARKERS)])
            for (decoder, variant, dashed), index in lines.items():
                if decoder not in decoder_colors:
                    continue  # the objective's own head: shown through the other decoders' lines and the table
                rows = rows_all.loc[index].assign(_beta=lambda f: f["beta"].map(to_float)).sort_values("_beta")
                errors = 1 - rows["test_acc"].astype(float)
                tops.append(float((errors + rows["test_acc_se"].astype(float).fillna(0)).max()))
                ax.errorbar(
                    rows["_beta"],
                    1 - rows["test_acc"].astype(float),
                    yerr=rows["test_acc_se"].astype(float),  # NaN (a single seed): no bar
                    color=decoder_colors[decoder],
                    linestyle="--" if dashed else "-",
                    marker=markers[variant],
                    capsize=3,
                    markersize=5,
                )
        for reference in references:
            rows = frame[(frame["objective"] == reference) & (frame["decoder"] == HEAD)]
            style = _reference_style(reference) | {"linestyle": "--" if reference == "ce" else ":"}
            for _, row in rows.iterrows():
                error, se = 1 - to_float(row["test_acc"]), to_float(row["test_acc_se"])
                tops.append(error + (0.0 if math.isnan(se) else se))
                ax.axhline(error, **style)
                if not math.isnan(se):
                    ax.axhspan(error - se, error + se, color=style["color"], alpha=0.1, linewidth=0)
        if betas:
            _beta_axis(ax, betas)
        else:
            _empty(ax)
        symbol = beta_symbol(objective) if objective is not None else "β"
        ax.set_xlabel(symbol)
        ax.set_title(objective_label(objective) if objective is not None else "", fontsize="medium")
        ax.grid(alpha=0.3)
    finite = [t for t in tops if math.isfinite(t)]
    if finite:
        axes[0].set_ylim(0, 1.1 * max(finite))  # shared: set once, after every panel is drawn
    axes[0].set_ylabel("generalization error (1 − test accuracy)")
    handles += [Line2D([], [], color=c, marker="o", label=f"decoder {d}") for d, c in decoder_colors.items()]
    handles += _style_handles(dashed_any, markers)
    for reference in references:
        if ((frame["objective"] == reference) & (frame["decoder"] == HEAD)).any():
            style = _reference_style(reference) | {"linestyle": "--" if reference == "ce" else ":"}
            handles.append(Line2D([], [], **style, label=f"{objective_label(reference)} (own classifier)"))
    fig.suptitle("Fig. 3: generalization error vs each objective's β", x=0.01, ha="left")
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


FIGURE_CAPTIONS = {
    "fig1_robustness": (
        "Figure 1: test accuracy at each ε under the per-image worst case over the attack suite (the paper's FGSM "
        "for runs from before the suite), one panel per decoder family, so IB and the baselines are compared "
        "through the same decoder: each objective one line per β (a colour map per objective: IB viridis, others "
        "orange, purple, …; IB dashed without its noise), CE red dashed and CE+DropConnect black dashed through "
        "that decoder, and dotted through their "
        "own classifier (an extra line, the same in every panel); faint × lines: worst cases marked unreliable; "
        "shaded bands ± s.e. over seeds."
    ),
    "fig2_infoplane": (
        "Figure 2: information-plane trajectories on the test set (x = I[X;Z+ε], the k-NN estimate with the "
        "zero-entropy noise ε, which is I[X;Z] for runs trained with that noise; y = cross-fitted H[Y|Z]), one "
        "panel per objective (IB with and without its noise apart) and one for the references, coloured by β, "
        "fainter at early epochs; circle: final epoch, square: best epoch by the validation split; dashed: the "
        "objective's own bound on I(X;Z) (VIB's KL, nlib's KDE bound, on training batches) against the same H[Y|Z]."
    ),
    "fig3_generalization": (
        "Figure 3: generalization error (1 − test accuracy) vs β, one panel per objective (β'' for IB), one line "
        "per decoder (dashed: IB without its noise), error bars ± s.e.; the reference objectives' own classifiers "
        "as horizontal lines (CE red dashed, CE+DropConnect black dotted)."
    ),
}
