"""Render the report's Markdown subset to one self-contained HTML page (PNGs inlined base64).

The subset is what the report and the benchmark tools write: ``#`` headings, pipe tables,
``- `` lists, fenced code, paragraphs, image lines ``![alt](path)``, and inline ``code``,
``**bold**`` and ``[text](url)``.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f5f5f5; padding: 0 0.2em; }
pre { background: #f5f5f5; padding: 0.6em; overflow-x: auto; }
figcaption { color: #555; font-size: 0.9em; }
.missing { color: #a03030; }
"""

_IMG = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)\s*$")


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', out)
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    head = _cells(lines[0])
    aligns = _cells(lines[1]) if len(lines) > 1 and set(lines[1]) <= set("|:- ") else None
    body = lines[2:] if aligns is not None else lines[1:]
    right = [a.endswith(":") and not a.startswith(":") for a in (aligns or [])]
    rows = ["<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
    for line in body:
        tds = []
        for i, c in enumerate(_cells(line)):
            cls = ' class="num"' if i < len(right) and right[i] else ""
            tds.append(f"<td{cls}>{_inline(c)}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _image(alt: str, src: str, base: Path) -> str:
    path = (base / src) if not Path(src).is_absolute() else Path(src)
    try:
        data = path.read_bytes()
    except OSError:
        return f'<p class="missing">missing image: {html.escape(src)}</p>'
    b64 = base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'
        f"<figcaption>{_inline(alt)}</figcaption></figure>"
    )


def markdown_to_html(text: str, base: Path, title: str) -> str:
    """The whole page; image paths are relative to ``base`` and inlined."""
    parts: list[str] = []
    lines = text.splitlines()
    i = 0
    para: list[str] = []

    def flush() -> None:
        if para:
            parts.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            parts.append("<pre>" + html.escape("\n".join(lines[i + 1 : j])) + "</pre>")
            i = j + 1
            continue
        if not stripped:
            flush()
        elif m := re.match(r"^(#{1,6})\s+(.*)$", stripped):
            flush()
            level = len(m.group(1))
            parts.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif m := _IMG.match(stripped):
            flush()
            parts.append(_image(m.group("alt"), m.group("src"), base))
        elif stripped.startswith("|"):
            flush()
            j = i
            while j < len(lines) and lines[j].strip().startswith("|"):
                j += 1
            parts.append(_table([ln for ln in lines[i:j]]))
            i = j
            continue
        elif stripped.startswith(("- ", "* ")):
            flush()
            j = i
            items = []
            while j < len(lines) and lines[j].strip().startswith(("- ", "* ")):
                items.append(f"<li>{_inline(lines[j].strip()[2:])}</li>")
                j += 1
            parts.append("<ul>" + "".join(items) + "</ul>")
            i = j
            continue
        else:
            para.append(stripped)
        i += 1
    flush()
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
