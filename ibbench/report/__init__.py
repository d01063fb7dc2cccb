"""`ibbench report`: tables and figures of a sweep, from its run directories alone.

`tables` aggregates runs (mean ± s.e. over seeds), `figures` draws the paper's figures, `render` writes
Markdown/HTML/LaTeX/CSV. Every function returns data; only `write_report` writes files.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ibbench import results
from ibbench.report.figures import (
    DPI,
    FIGURE_CAPTIONS,
    FIGURE_SIZES,
    figure_generalization,
    figure_infoplane,
    figure_robustness,
)
from ibbench.report.render import (
    Block,
    document_html,
    document_markdown,
    table_csv,
    table_html,
    table_latex,
    table_markdown,
)
from ibbench.report.tables import (
    CAVEAT,
    INFOPLANE_VALUES,
    KEY_LABELS,
    ROBUSTNESS_CAVEAT,
    Metric,
    Table,
    accuracy_table,
    attack_settings_text,
    attack_table,
    fmt_key,
    infoplane_table,
    is_missing,
    masking_table,
    mean_se,
    robustness_table,
    unfinished_table,
    usable_runs,
)

__all__ = [
    "CAVEAT",
    "DPI",
    "FIGURE_SIZES",
    "INFOPLANE_VALUES",
    "Metric",
    "Report",
    "Table",
    "accuracy_table",
    "attack_table",
    "build_report",
    "figure_generalization",
    "figure_infoplane",
    "figure_robustness",
    "infoplane_table",
    "is_missing",
    "masking_table",
    "mean_se",
    "robustness_table",
    "table_csv",
    "table_html",
    "table_latex",
    "table_markdown",
    "unfinished_table",
    "write_report",
]

# (table, the figure shown with it), in the document's order
SECTIONS = (("accuracy", "fig3_generalization"), ("robustness", "fig1_robustness"), ("infoplane", "fig2_infoplane"))
# tables shown after a section's figure: the evidence behind the robustness table
DETAILS = {"robustness": ("robustness_attacks", "masking")}


@dataclass
class Report:
    """Everything a report shows, before it is written."""

    root: Path
    runs: pd.DataFrame
    tables: dict[str, Table]
    unfinished: Table
    figures: dict[str, Figure]

    @property
    def title(self) -> str:
        return f"ibbench report: {self.root.name or self.root}"

    def blocks(self) -> list[Block]:
        """The document as (kind, content) blocks, rendered to Markdown and HTML alike."""
        runs = self.runs
        total = len(runs)
        states = runs["status"].value_counts().to_dict() if total else {}
        state_text = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"
        sweeps = sorted(runs["sweep"].dropna().unique()) if total else []
        seeds = sorted({int(s) for s in runs.loc[usable_runs(runs), "seed"].dropna()}) if total else []
        intro = (
            f"{total} runs below {self.root} (sweep{'s' if len(sweeps) != 1 else ''}: {', '.join(sweeps) or '–'}): "
            f"{state_text}. Tables and figures use the done runs; every number is a mean over the seeds of one "
            f"configuration (seeds {', '.join(map(str, seeds)) or '–'}) with its standard error (sample std / √n); "
            f"'–' marks a value that was not measured."
        )
        out: list[Block] = [("h1", self.title), ("p", intro)]
        if not self.tables["accuracy"].frame.empty and not self.tables["accuracy"].show_se:
            out.append(("p", "Every configuration has a single seed: no standard errors can be given."))
        out += [("h2", "Caveat: the entropy estimates"), ("caveat", CAVEAT)]
        out += [("h2", "Caveat: how robustness is measured"), ("caveat", ROBUSTNESS_CAVEAT)]
        for name, figure in SECTIONS:
            table = self.tables[name]
            out += [("h2", table.title), ("p", table.note)]
            if name == "robustness":
                out += [("p", attack_settings_text(runs))] + self._unreliable_blocks()
            out += [("table", table), ("figure", (figure, FIGURE_CAPTIONS[figure]))]
            for detail in DETAILS.get(name, ()):
                extra = self.tables[detail]
                out += [("h2", extra.title), ("p", extra.note), ("table", extra)]
        out.append(("h2", self.unfinished.title))
        if self.unfinished.frame.empty:
            out.append(("p", f"None: all {total} runs finished."))
        else:
            out += [("p", self.unfinished.note), ("table", self.unfinished)]
        return out

    def _unreliable_blocks(self) -> list[Block]:
        """A paragraph naming every (model, decoder) whose worst case looks masked, with the numbers."""
        masking = self.tables["masking"].frame
        if masking.empty:
            return []
        bad = masking[masking["verdict"] == "unreliable"]
        if bad.empty:
            return [("p", f"No worst case is marked unreliable ({len(masking)} (model, decoder) pairs checked).")]
        lines = []
        for _, row in bad.iterrows():
            model = ", ".join(f"{KEY_LABELS.get(k, k)}={fmt_key(k, row[k])}" for k in self.tables["masking"].keys[:-3])
            lines.append(f"{model}, decoder {row['decoder']}: {row['reasons']}")
        return [("p", f"Unreliable worst cases ({len(bad)}), not ranked: " + " | ".join(lines))]


def build_report(root: Path | str) -> Report:
    """Load the runs below root and compute every table and figure."""
    root = Path(root)
    runs = results.load_runs(root)
    metrics = results.load_metrics(root)
    tables = {
        "accuracy": accuracy_table(runs),
        "robustness": robustness_table(runs),
        "robustness_attacks": attack_table(runs),
        "masking": masking_table(runs),
        "infoplane": infoplane_table(runs, metrics),
    }
    figures = {
        "fig1_robustness": figure_robustness(runs, tables["robustness_attacks"]),
        "fig2_infoplane": figure_infoplane(runs, metrics),
        "fig3_generalization": figure_generalization(runs, tables["accuracy"]),
    }
    return Report(root, runs, tables, unfinished_table(runs), figures)


def _save(fig: Figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    # No CreationDate in PDFs: the same runs give byte-identical files.
    fig.savefig(buffer, format=fmt, dpi=DPI, **({"metadata": {"CreationDate": None}} if fmt == "pdf" else {}))
    return buffer.getvalue()


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
        pngs[name] = _save(fig, "png")
        put(f"{name}.png", pngs[name])
        put(f"{name}.pdf", _save(fig, "pdf"))
    blocks = report.blocks()
    put("report.md", document_markdown(blocks))
    put("report.html", document_html(report.title, blocks, pngs))
    return written
