"""A self-contained HTML report: text, tables and figures (embedded as base64 PNG), no external files."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 80rem;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.5rem; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
figure { margin: 1rem 0; } figure img { max-width: 100%; } figcaption { font-size: 0.85rem; color: #555; }
p.note { font-size: 0.85rem; color: #555; }
"""


@dataclass(frozen=True)
class Table:
    """A table of preformatted cells; the first ``text_columns`` columns are left-aligned text."""

    title: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    text_columns: int = 1
    note: str = ""


@dataclass(frozen=True)
class Image:
    """A PNG image with a caption."""

    title: str
    png: bytes
    caption: str = ""


@dataclass(frozen=True)
class Paragraph:
    text: str


Section = Table | Image | Paragraph


def figure_png(figure: Figure, dpi: int = 120) -> bytes:
    """The figure rendered as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def _render_table(table: Table) -> str:
    def cell(tag: str, index: int, text: str) -> str:
        css = ' class="text"' if index < table.text_columns else ""
        return f"<{tag}{css}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(table.header))
    body = "\n".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in table.rows)
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return f"<h2>{html.escape(table.title)}</h2>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n{note}"


def _render_image(image: Image) -> str:
    data = base64.b64encode(image.png).decode("ascii")
    caption = f"<figcaption>{html.escape(image.caption)}</figcaption>" if image.caption else ""
    return f'<h2>{html.escape(image.title)}</h2>\n<figure><img alt="{html.escape(image.title)}" src="data:image/png;base64,{data}">{caption}</figure>'


def render_html(title: str, sections: Sequence[Section]) -> str:
    """The whole page as one string; every text is HTML-escaped."""
    parts = []
    for section in sections:
        if isinstance(section, Table):
            parts.append(_render_table(section))
        elif isinstance(section, Image):
            parts.append(_render_image(section))
        elif isinstance(section, Paragraph):
            parts.append(f"<p>{html.escape(section.text)}</p>")
        else:
            raise TypeError(f"cannot render {type(section).__name__}; expected Table, Image or Paragraph")
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n"
    )
