"""Report rendering: tables as Markdown, HTML, LaTeX (booktabs) and CSV; a document of blocks as Markdown or
self-contained HTML (figures inlined as PNG data). Pure functions returning strings.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ibbench.report.tables import DASH, KEY_LABELS, Table, beta_symbol, fmt_key, is_reference, to_float


def _fmt_number(value: Any, digits: int) -> str:
    value = to_float(value)
    return DASH if math.isnan(value) else f"{value:.{digits}f}"


def _cells(table: Table) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header labels and rows of (text, bold) cells: keys, n, then each metric and its ± column."""
    frame = table.frame
    show_se = table.show_se
    # β means a different thing per objective: the header is the symbol of the objectives shown (β'' for ib), and
    # where several meanings share the column each cell carries its own symbol.
    symbols = set()
    if "objective" in table.keys and not frame.empty:
        symbols = {beta_symbol(o) for o in frame["objective"] if not is_reference(o)}
    mixed = len(symbols) > 1
    labels = {**KEY_LABELS, "beta": "β" if mixed else (next(iter(symbols)) if symbols else KEY_LABELS["beta"])}
    headers = [labels.get(k, k) for k in table.keys]
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
        cells = [(fmt_key(k, row[k], row["objective"] if k == "beta" and mixed else None), False) for k in table.keys]
        if table.metrics:
            cells.append((fmt_key("n", row.get("n")), False))
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


# -- documents ---------------------------------------------------------------------------------------------------

# A document is a list of (kind, content) blocks: ("h1"|"h2"|"p", text), ("caveat", text), ("table", Table),
# ("figure", (name, caption)). Figures are referenced by name: <name>.png beside the Markdown, inlined in HTML.
Block = tuple[str, Any]

HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1250px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
.table-wrap { max-width: 100%; overflow-x: auto; margin: 0.8em 0 1.2em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; white-space: nowrap; }
th { border-bottom: 2px solid #888; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; }
.caveat { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 1em; }
"""


def document_markdown(blocks: Sequence[Block]) -> str:
    """The document as Markdown; tables link their .csv/.tex, figures their .png/.pdf beside it."""
    parts = []
    for kind, content in blocks:
        if kind == "h1":
            parts.append(f"# {content}")
        elif kind == "h2":
            parts.append(f"## {content}")
        elif kind == "p":
            parts.append(content)
        elif kind == "caveat":
            parts.append("> " + content)
        elif kind == "table":
            parts.append(table_markdown(content))
            parts.append(f"Files: [{content.name}.csv]({content.name}.csv), [{content.name}.tex]({content.name}.tex)")
        elif kind == "figure":
            name, caption = content
            parts.append(f"![{caption.split(':')[0]}]({name}.png)")
            parts.append(f"*{caption}* ([PDF]({name}.pdf))")
    return "\n\n".join(parts) + "\n"


def document_html(title: str, blocks: Sequence[Block], pngs: Mapping[str, bytes]) -> str:
    """One self-contained HTML page: no external resource, figures inlined as base64 PNG, wide tables scroll."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"/>',
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>',
        f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style></head><body>",
    ]
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(content)}</p>")
        elif kind == "caveat":
            parts.append(f'<p class="caveat">{html.escape(content)}</p>')
        elif kind == "table":
            parts.append(f'<div class="table-wrap">{table_html(content)}</div>')
        elif kind == "figure":
            name, caption = content
            data = base64.b64encode(pngs[name]).decode("ascii")
            parts.append(
                f'<figure id="{html.escape(name)}"><img alt="{html.escape(caption.split(":")[0])}" '
                f'src="data:image/png;base64,{data}"/><figcaption>{html.escape(caption)}</figcaption></figure>'
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
