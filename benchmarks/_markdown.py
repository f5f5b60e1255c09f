"""A Markdown table from a DataFrame, shared by the benchmark scripts that write docs/ pages."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd


def markdown_table(
    table: pd.DataFrame, cell: Callable[[str, object], str] = lambda _, v: str(v), index: str | None = None
) -> str:
    """Rows of ``table`` as a Markdown table; ``cell(column, value)`` formats a value, ``index`` heads the row names."""
    header = ([index] if index is not None else []) + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, row in table.iterrows():
        cells = ([str(name)] if index is not None else []) + [cell(str(c), v) for c, v in row.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
