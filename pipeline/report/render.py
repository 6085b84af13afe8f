"""A report as a list of sections of blocks, written out as self-contained HTML and as Markdown.

The HTML embeds every figure as a base64 PNG and carries its own CSS: no script, no external
request, so it opens offline, from an e-mail attachment, or in the MLflow UI's artifact view.
The Markdown links the PNGs in figures/ (next to their PDFs) instead.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.report.figures import Figure


@dataclass
class Text:
    text: str  # a paragraph; **bold** and `code` are kept in both outputs


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    df: pd.DataFrame
    caption: str = ""


@dataclass
class FigureBlock:
    figure: Figure | None
    missing: str = ""  # why the figure is not there
    title: str = ""
    number: int = 0


def figure_block(figs: dict, name: str, title: str) -> FigureBlock:
    """A drawn figure, or the reason it is not there (figs[name] is a Figure or a sentence)."""
    result = figs.get(name)
    if isinstance(result, Figure):
        return FigureBlock(result, title=title)
    return FigureBlock(None, missing=result or "Not drawn.", title=title)


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


@dataclass
class Document:
    title: str
    subtitle: str
    sections: list[Section]


def fmt_cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def number_figures(doc: Document) -> None:
    n = 0
    for s in doc.sections:
        for b in s.blocks:
            if isinstance(b, FigureBlock) and b.figure is not None:
                n += 1
                b.number = n


# --- HTML ------------------------------------------------------------------------------------------
CSS = """
body{font:15px/1.5 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#222;max-width:1180px;margin:2em auto;padding:0 1.2em}
h1{font-size:1.7em;margin-bottom:.1em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin:1.6em 0 .4em}.subtitle{color:#666;margin-top:0}
nav ul{columns:2;list-style:none;padding-left:0}nav a{text-decoration:none;color:#2a5db0}
table{border-collapse:collapse;font-size:12.5px;margin:.6em 0 1.2em;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap}th{background:#f4f4f4;text-align:left}
td.l{text-align:left}td.text{text-align:left;white-space:normal}
caption{caption-side:bottom;text-align:left;color:#555;font-size:12.5px;padding-top:.3em}
figure{margin:1.2em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:13.5px;margin-top:.4em}.missing{color:#8a6d3b;background:#fcf8e3;padding:.5em .8em;border-radius:4px}
code{background:#f4f4f4;padding:0 3px;border-radius:3px;font-size:90%}
.collapsed{color:#c44e52;font-weight:600}.partial{color:#c0692c;font-weight:600}.healthy{color:#3b8a4c;font-weight:600}
"""


def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


_VERDICT_CLASS = {"collapsed", "partial", "healthy"}
_NUMBER = re.compile(r"^[−+-]?[\d.,]+(e[−+-]?\d+)?( \[.*\])?( \*)?$")  # " *": a significance marker


def _is_text(v) -> bool:
    """Left-align words (config labels, reasons); right-align numbers and "mean [low, high]"."""
    return isinstance(v, str) and v != "–" and not _NUMBER.match(v)


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.df.columns)
    body = []
    for _, row in t.df.iterrows():
        cells = []
        for v in row:
            s = fmt_cell(v)
            cls = s if s in _VERDICT_CLASS else ("text" if len(s) > 60 else "l" if _is_text(v) else "")
            cells.append(f'<td class="{cls}">{html.escape(s)}</td>' if cls else f"<td>{html.escape(s)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<caption>{_inline_html(t.caption)}</caption>" if t.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure_html(b: FigureBlock) -> str:
    title = f"<h3>{html.escape(b.title)}</h3>" if b.title else ""
    if b.figure is None:
        return f'{title}<p class="missing">{_inline_html(b.missing)}</p>'
    data = base64.b64encode(b.figure.png.read_bytes()).decode("ascii")
    return (f'{title}<figure id="fig-{b.figure.name}"><img src="data:image/png;base64,{data}" '
            f'alt="Figure {b.number}: {html.escape(b.title or b.figure.name)}">'
            f"<figcaption><strong>Figure {b.number}.</strong> {_inline_html(b.figure.caption)} "
            f"(PDF: <code>figures/{b.figure.pdf.name}</code>)</figcaption></figure>")


def to_html(doc: Document) -> str:
    parts = [f"<h1>{html.escape(doc.title)}</h1>", f'<p class="subtitle">{_inline_html(doc.subtitle)}</p>',
             "<nav><ul>" + "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in doc.sections)
             + "</ul></nav>"]
    for s in doc.sections:
        parts.append(f'<h2 id="{s.anchor}">{html.escape(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Text):
                parts.append(f"<p>{_inline_html(b.text)}</p>")
            elif isinstance(b, Bullets):
                parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
            elif isinstance(b, Table):
                parts.append(_table_html(b))
            elif isinstance(b, FigureBlock):
                parts.append(_figure_html(b))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(doc.title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


# --- Markdown --------------------------------------------------------------------------------------
def _md_cell(v) -> str:
    return fmt_cell(v).replace("|", "\\|").replace("\n", " ")


def _table_md(t: Table) -> str:
    cols = [str(c) for c in t.df.columns]
    text = [any(_is_text(fmt_cell(v)) for v in t.df[c]) for c in t.df.columns]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |",
             "|" + "|".join("---" if is_text else "---:" for is_text in text) + "|"]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for _, row in t.df.iterrows()]
    if t.caption:
        lines += ["", f"*{t.caption}*"]
    return "\n".join(lines)


def _figure_md(b: FigureBlock) -> str:
    title = f"### {b.title}\n\n" if b.title else ""
    if b.figure is None:
        return f"{title}> {b.missing}"
    f = b.figure
    return (f"{title}![Figure {b.number}: {b.title or f.name}](figures/{f.png.name})\n\n"
            f"**Figure {b.number}.** {f.caption} ([PDF](figures/{f.pdf.name}))")


def to_markdown(doc: Document) -> str:
    parts = [f"# {doc.title}", "", doc.subtitle, ""]
    parts += [f"- [{s.title}](#{s.anchor})" for s in doc.sections] + [""]
    for s in doc.sections:
        parts += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Text):
                parts.append(b.text)
            elif isinstance(b, Bullets):
                parts.append("\n".join(f"- {i}" for i in b.items))
            elif isinstance(b, Table):
                parts.append(_table_md(b))
            elif isinstance(b, FigureBlock):
                parts.append(_figure_md(b))
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def write(doc: Document, out_dir: Path) -> tuple[Path, Path]:
    number_figures(doc)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    html_path.write_text(to_html(doc), encoding="utf-8")
    md_path.write_text(to_markdown(doc), encoding="utf-8")
    return html_path, md_path
