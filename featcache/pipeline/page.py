"""The report's own small Markdown (headings, paragraphs, quotes, tables, images, code) rendered as one HTML page."""

from __future__ import annotations

import html
import re


def to_html(markdown: str, title: str) -> str:
    """The report's own small Markdown (headings, paragraphs, quotes, tables, images, code) as one HTML page."""
    body: list[str] = []
    table: list[list[str]] = []

    def inline(text: str) -> str:
        t = html.escape(text)
        t = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2" style="max-width:100%">', t)
        t = re.sub(r"\[(<img [^>]*>)\]\(([^)]+)\)", r'<a href="\2">\1</a>', t)
        t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", t)

    def flush() -> None:
        if table:
            rows = [r for r in table if not set("".join(r)) <= set("-: ")]
            body.append("<table>" + "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{inline(c)}</{'th' if i == 0 else 'td'}>"
                                                             for c in r) + "</tr>" for i, r in enumerate(rows)) + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("> "):
            body.append(f"<blockquote>{inline(line[2:])}</blockquote>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"
             "blockquote{background:#fff4e0;border-left:4px solid #e0a000;margin:1em 0;padding:.5em 1em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
