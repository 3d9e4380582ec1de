"""Reports as documents: headings, text, lists, tables (best values in bold; a cell may be a mean with its interval),
images; rendered as Markdown and as self-contained HTML (images embedded). Also the style of every HTML page the
project writes."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Estimate", "HTML_STYLE", "inline_html", "Report", "REPORT_STYLE", "Table"]

HTML_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; }
th { background: #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
dt { font-weight: bold; margin-top: 0.4em; }
dd { margin-left: 1.5em; font-family: monospace; white-space: pre-wrap; }
img { max-width: 100%; image-rendering: pixelated; }
"""
REPORT_STYLE = (HTML_STYLE + "td.best { background: #e6f2e6; }\n"
                "pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }")


@dataclass(frozen=True)
class Estimate:
    """A table cell: a mean with its 95 % interval, shown 'mean [lo, hi]' in the column's format; tables compare
    (and bold) the mean."""

    mean: float
    lo: float
    hi: float

    @classmethod
    def of(cls, vals: Mapping[str, Any], key: str) -> Any:
        """vals[key], as an Estimate when vals also holds its interval `<key>_ci95` = [lo, hi]."""
        ci = vals.get(f"{key}_ci95")
        if ci is None:
            return vals[key]
        lo, hi = (math.nan if x is None else float(x) for x in ci)
        return cls(math.nan if vals[key] is None else float(vals[key]), lo, hi)

    def parts(self, fmt: str | None) -> tuple[str, str]:
        """('0.809', ' [0.791, 0.824]'): the mean and the interval as shown; ('–', '') without a mean."""
        if not math.isfinite(self.mean):
            return "–", ""
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return format(self.mean, fmt or ""), ""
        return format(self.mean, fmt or ""), f" [{format(self.lo, fmt or '')}, {format(self.hi, fmt or '')}]"


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float, Estimate))


@dataclass
class Table:
    """A report table; `better` per column: 'min', 'max' or None; `fmt` per column: a format spec or None. A cell
    is a value or an `Estimate` (mean [lo, hi])."""

    header: list[str]
    rows: list[list[Any]]
    better: list[str | None]
    fmt: list[str | None]

    @classmethod
    def of_metrics(cls, first: str, data: dict[str, dict[str, Any]], cols: Sequence[tuple]) -> Table:
        """Rows = the entries of `data` (name -> {key: value}); `cols` = (key, header, better, fmt) per column; a
        value with its interval under `<key>_ci95` becomes an Estimate."""
        return cls([first] + [c[1] for c in cols],
                   [[name] + [Estimate.of(vals, c[0]) for c in cols] for name, vals in data.items()],
                   [None] + [c[2] for c in cols], [None] + [c[3] for c in cols])

    @classmethod
    def plain(cls, header: list[str], rows: list[list[Any]]) -> Table:
        """A table without best values or number formats (cells shown as they are)."""
        return cls(header, rows, [None] * len(header), [None] * len(header))

    def parts(self, r: int, c: int) -> tuple[str, str]:
        """The cell as shown, split into its value (what a best cell bolds) and the rest (an interval)."""
        v = self.rows[r][c]
        if isinstance(v, Estimate):
            return v.parts(self.fmt[c])
        if isinstance(v, float) and math.isnan(v):
            return "–", ""
        if self.fmt[c] and isinstance(v, (int, float)):
            return format(v, self.fmt[c]), ""
        return str(v), ""

    def text(self, r: int, c: int) -> str:
        return "".join(self.parts(r, c))

    def best(self, c: int) -> set[int]:
        """Rows holding the best value (an Estimate's mean) of column c, compared as displayed (ties all win)."""
        if not self.better[c]:
            return set()
        vals = {r: float(self.parts(r, c)[0]) for r in range(len(self.rows))
                if _numeric(self.rows[r][c]) and self.parts(r, c)[0] != "–"}
        if not vals:
            return set()
        pick = min(vals.values()) if self.better[c] == "min" else max(vals.values())
        return {r for r, v in vals.items() if v == pick}

    def winners(self) -> dict[str, list[str]]:
        """Column header -> names (first cell) of its best rows."""
        return {self.header[c]: [str(self.rows[r][0]) for r in sorted(self.best(c))]
                for c in range(len(self.header)) if self.better[c] and self.best(c)}


class Report:
    """Blocks (headings, text, lists, tables, images, preformatted text) rendered as Markdown and HTML."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def h(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, t: Table) -> None:
        self.blocks.append(("table", t))

    def img(self, file: str, alt: str) -> None:
        self.blocks.append(("img", file, alt))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b[0] == "h":
                out += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "ul":
                out += [f"- {item}" for item in b[1]] + [""]
            elif b[0] == "img":
                out += [f"![{b[2]}]({b[1]})", ""]
            elif b[0] == "pre":
                out += ["```", b[1].rstrip("\n"), "```", ""]
            else:
                t: Table = b[1]
                best = [t.best(c) for c in range(len(t.header))]
                out.append("| " + " | ".join(t.header) + " |")
                numeric = [all(_numeric(row[c]) for row in t.rows) for c in range(len(t.header))]
                out.append("|" + "|".join("---:" if num else "---" for num in numeric) + "|")
                for r in range(len(t.rows)):
                    cells = []
                    for c in range(len(t.header)):
                        head, tail = (x.replace("|", "\\|") for x in t.parts(r, c))
                        cells.append(f"**{head}**{tail}" if r in best[c] else head + tail)
                    out.append("| " + " | ".join(cells) + " |")
                out.append("")
        return "\n".join(out)

    def html(self, folder: Path) -> str:
        """Self-contained HTML: images are embedded as data: URIs read from `folder`."""
        e = html.escape
        parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(self.title)}</title>",
                 f"<style>{REPORT_STYLE}</style>",
                 "</head><body>", f"<h1>{e(self.title)}</h1>"]
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{inline_html(b[1])}</p>")
            elif b[0] == "ul":
                parts.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "img":
                data = base64.b64encode((folder / b[1]).read_bytes()).decode("ascii")
                parts.append(f'<p><img src="data:image/png;base64,{data}" alt="{e(b[2])}"></p>')
            elif b[0] == "pre":
                parts.append(f"<pre>{e(b[1])}</pre>")
            else:
                t = b[1]
                best = [t.best(c) for c in range(len(t.header))]
                rows = ["<tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr>"]
                for r in range(len(t.rows)):
                    cells = []
                    for c in range(len(t.header)):
                        cls = ["num"] if _numeric(t.rows[r][c]) else []
                        cls += ["best"] if r in best[c] else []
                        attr = f' class="{" ".join(cls)}"' if cls else ""
                        head, tail = t.parts(r, c)
                        text = f"<strong>{e(head)}</strong>{e(tail)}" if r in best[c] else e(head + tail)
                        cells.append(f"<td{attr}>{text}</td>")
                    rows.append("<tr>" + "".join(cells) + "</tr>")
                parts.append("<table>" + "\n".join(rows) + "</table>")
        parts.append("</body></html>\n")
        return "\n".join(parts)


def inline_html(text: str) -> str:
    """Escape text for HTML, turning Markdown **bold** and `code` into tags."""
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)
