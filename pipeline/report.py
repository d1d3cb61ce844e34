"""Rendering of result tables and the self-contained HTML report (the ``tables`` stage).

A :class:`Table` holds typed cells; the writers render the same cells as Markdown, CSV and
LaTeX (written here rather than through pandas, whose ``to_markdown`` needs ``tabulate`` and
``to_latex`` needs ``jinja2``), and as HTML for ``report.html``. Numbers are rounded only for
display: Markdown, LaTeX and HTML show ``digits`` decimals, CSV keeps four. Missing values are
empty in CSV and "–" elsewhere. The report embeds every figure as a base64 PNG, so the file can
be mailed or archived with no external assets.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import atomic_write_text

MISSING = "–"
Cell = str | int | float | None


@dataclass
class Table:
    """A result table.

    Args:
        name: file stem, e.g. ``table1_bp4d`` (-> ``table1_bp4d.md/.csv/.tex``).
        title: caption.
        columns: header cells.
        rows: one list of cells per row (``str``, ``int``, ``float`` or ``None``).
        notes: sentences printed under the table (protocols, sources, "not run" reasons).
        digits: decimals shown for floats in Markdown / LaTeX / HTML.
        col_digits: per-column overrides of ``digits`` (e.g. a loss with 3 decimals).
    """
    name: str
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    digits: int = 1
    col_digits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        for r in self.rows:
            if len(r) != len(self.columns):
                raise ValueError(f"table {self.name}: row {r} has {len(r)} cells for "
                                 f"{len(self.columns)} columns")

    def add(self, row: list[Cell]) -> None:
        if len(row) != len(self.columns):
            raise ValueError(f"table {self.name}: row {row} has {len(row)} cells for "
                             f"{len(self.columns)} columns")
        self.rows.append(row)

    def cell_digits(self) -> list[int]:
        return [self.col_digits.get(c, self.digits) for c in self.columns]

    def numeric_columns(self) -> list[bool]:
        return [any(_is_number(r[i]) for r in self.rows) and
                all(_is_number(r[i]) or r[i] is None for r in self.rows)
                for i in range(len(self.columns))]


def _is_number(v: Cell) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_missing(v: Cell) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt(v: Cell, digits: int) -> str:
    """Display form of a cell (Markdown / LaTeX / HTML)."""
    if _is_missing(v):
        return MISSING
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _csv_cell(v: Cell) -> str:
    if _is_missing(v):
        return ""
    if isinstance(v, float):
        return str(round(v, 4))
    return str(v)


# --------------------------------------------------------------------------- writers
def to_markdown(t: Table) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    num = t.numeric_columns()
    lines = [f"### {t.title}", "",
             "| " + " | ".join(esc(c) for c in t.columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in num) + "|"]
    dg = t.cell_digits()
    lines += ["| " + " | ".join(esc(fmt(v, d)) for v, d in zip(r, dg)) + " |" for r in t.rows]
    if t.notes:
        lines.append("")
        lines += [f"*{esc(n)}*  " for n in t.notes]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(t.columns)
    for r in t.rows:
        w.writerow([_csv_cell(v) for v in r])
    return buf.getvalue()


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}", "λ": r"$\lambda$", "Δ": r"$\Delta$",
                "–": "--", "−": "$-$", "≥": r"$\geq$", ">": "$>$", "<": "$<$"}


def tex_escape(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in s)


def to_latex(t: Table) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
    num = t.numeric_columns()
    spec = "".join("r" if n else "l" for n in num)
    lines = [f"% {tex_escape(t.title)}", r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{tex_escape(t.title)}}}", rf"\label{{tab:{t.name}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(tex_escape(c) for c in t.columns) + r" \\", r"\midrule"]
    dg = t.cell_digits()
    lines += [" & ".join(tex_escape(fmt(v, d)) for v, d in zip(r, dg)) + r" \\" for r in t.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if t.notes:
        lines.append(r"\par\smallskip\footnotesize " + " ".join(tex_escape(n) for n in t.notes))
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_html(t: Table) -> str:
    num, dg = t.numeric_columns(), t.cell_digits()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    body = []
    for r in t.rows:
        cells = "".join(f'<td class="{"num" if n else "txt"}">{html.escape(fmt(v, d))}</td>'
                        for v, n, d in zip(r, num, dg))
        cls = ' class="published"' if any(isinstance(v, str) and "published" in v
                                           for v in r) else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in t.notes)
    return (f'<figure class="table" id="{html.escape(t.name)}"><table><caption>'
            f"{html.escape(t.title)}</caption><thead><tr>{head}</tr></thead><tbody>"
            f"{''.join(body)}</tbody></table>{notes}</figure>")


def write_table(t: Table, out_dir: str | Path) -> list[Path]:
    """Write ``<name>.md``, ``.csv`` and ``.tex`` atomically; return the paths."""
    out_dir = Path(out_dir)
    paths = []
    for ext, text in (("md", to_markdown(t)), ("csv", to_csv(t)), ("tex", to_latex(t))):
        p = out_dir / f"{t.name}.{ext}"
        atomic_write_text(p, text)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- HTML report
def figure_html(png: str | Path, caption: str) -> str:
    """An ``<img>`` with the PNG inlined as base64 (no external file)."""
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return (f'<figure class="fig"><img alt="{html.escape(caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}'
            f"</figcaption></figure>")


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
th,td{border:1px solid #ddd;padding:.25em .5em}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.published td{color:#555;background:#fafafa;font-style:italic}
p.note{font-size:.85em;color:#555;margin:.2em 0}
figure{margin:1em 0}figure.fig img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.4em .8em}
code{background:#f4f4f4;padding:0 .2em}
"""


@dataclass
class Section:
    """One report section: a heading and HTML blocks (paragraphs, tables, figures)."""
    title: str
    blocks: list[str] = field(default_factory=list)

    def para(self, text: str) -> None:
        self.blocks.append(f"<p>{html.escape(text)}</p>")

    def table(self, t: Table) -> None:
        self.blocks.append(to_html(t))

    def figure(self, png: str | Path, caption: str) -> None:
        self.blocks.append(figure_html(png, caption))

    def warning(self, text: str) -> None:
        self.blocks.append(f'<p class="warn">{html.escape(text)}</p>')


# Where append_sections inserts: the end of the table of contents and of the sections.
_TOC_END, _SECTIONS_END = "<!--toc-end-->", "<!--sections-end-->"


def _toc_items(sections: list[Section], start: int = 0) -> str:
    return "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>'
                   for i, s in enumerate(sections, start))


def _section_parts(sections: list[Section], start: int = 0) -> str:
    return "".join(f'<section id="s{i}"><h2>{html.escape(s.title)}</h2>{"".join(s.blocks)}'
                   "</section>" for i, s in enumerate(sections, start))


def render_report(title: str, intro: list[str], sections: list[Section]) -> str:
    """The whole report as one HTML string (inline CSS, inline images)."""
    intro_html = "".join(f"<p>{html.escape(p)}</p>" for p in intro)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{intro_html}<ul>{_toc_items(sections)}{_TOC_END}"
            f"</ul>{_section_parts(sections)}{_SECTIONS_END}</body></html>\n")


def append_sections(path: str | Path, sections: list[Section]) -> Path:
    """Add ``sections`` (with table-of-contents entries) to the end of a written report."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.count(_TOC_END) != 1 or text.count(_SECTIONS_END) != 1:
        raise ValueError(f"{path}: not a report written by pipeline.report.render_report; "
                         "re-run the tables stage")
    start = text.count('<section id="s')
    text = text.replace(_TOC_END, _toc_items(sections, start) + _TOC_END)
    text = text.replace(_SECTIONS_END, _section_parts(sections, start) + _SECTIONS_END)
    atomic_write_text(path, text)
    return path


def write_report(path: str | Path, title: str, intro: list[str],
                 sections: list[Section]) -> Path:
    path = Path(path)
    atomic_write_text(path, render_report(title, intro, sections))
    return path
