"""Markdown tables for the benchmark scripts (one formatter, so every results page reads alike)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence


def _default(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str],
                   formats: Mapping[str, Callable[[object], str]] | None = None) -> str:
    """`rows` (dicts) as a Markdown table of `columns`; `formats` overrides a column's formatting."""
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row[column]
            cells.append(_default(value) if value is None else formats.get(column, _default)(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def publish(text: str, script: str, argv: Sequence[str], markdown_path: str | None) -> None:
    """Print a results page and, if asked, write it with the command that reproduces it."""
    print(text)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(f"Command: `python benchmarks/{script} {' '.join(argv)}`\n\n{text}")
