"""Markdown pipe tables: the one builder of every table raybpo writes (reward models, win rates, the
report's blocks, tune's results)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """The header, a `---` rule and one line per row; a `|` inside a row's cell is escaped. No final newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)
