"""MkDocs hook: put benchmark tables from ``benchmarks/results/`` into the pages that present them.

A page line ``<!-- benchmark-table: NAME -->`` becomes ``benchmarks/results/NAME.md`` followed by
the command that produced it (from ``NAME.json``), or a clearly marked notice when the
benchmark has not been run yet, so the docs never hold a stale copy of a result. A line
``<!-- benchmark-figure: NAME -->`` embeds ``benchmarks/results/NAME.png`` (inline, since it lies
outside ``docs/``), or nothing when there is no such figure.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- benchmark-(table|figure): ([\w.-]+) -->$", re.MULTILINE)


def benchmark_table(name: str, results: Path = RESULTS) -> str:
    """Markdown for the benchmark ``name``: its table and the command that re-runs it."""
    table = results / f"{name}.md"
    if not table.is_file():
        return (
            f'!!! warning "Not run yet"\n'
            f"    `benchmarks/results/{name}.md` does not exist yet; this section shows its results "
            f"once the benchmark has been run.\n"
        )
    text = table.read_text(encoding="utf-8").strip()
    # The report's own "# Title" would be a second page title: keep it as a bold line.
    if text.startswith("# "):
        title, _, rest = text.partition("\n")
        text = f"**{title[2:].strip()}**\n\n{rest.strip()}"
    text += "\n"
    meta = results / f"{name}.json"
    if meta.is_file():
        command = json.loads(meta.read_text(encoding="utf-8")).get("command")
        if command and command not in text:
            text += f"\nProduced by `{command}` (`benchmarks/results/{name}.json` has every row).\n"
    return text


def benchmark_figure(name: str, results: Path = RESULTS) -> str:
    """An inline ``<img>`` of ``NAME.png``, or an empty string when it does not exist."""
    png = results / f"{name}.png"
    if not png.is_file():
        return ""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img alt="benchmarks/results/{name}.png" src="data:image/png;base64,{data}">\n'


def on_page_markdown(markdown: str, **_: Any) -> str:
    def replace(m: re.Match[str]) -> str:
        kind, name = m.group(1), m.group(2)
        return benchmark_table(name) if kind == "table" else benchmark_figure(name)

    return MARKER.sub(replace, markdown)
