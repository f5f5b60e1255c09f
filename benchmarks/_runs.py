"""Per-seed runs kept in a CSV, so an interrupted benchmark resumes where it stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd


def rows_by_seed(csv: Path, seeds: Iterable[int], run: Callable[[int], dict], resume: bool) -> pd.DataFrame:
    """One row per seed from ``run(seed)``, written to ``csv`` after each; with ``resume``, seeds already there are kept."""
    rows = pd.read_csv(csv) if resume and csv.exists() else pd.DataFrame(columns=["seed"])
    for seed in seeds:
        if seed in set(rows["seed"]):
            continue
        rows = pd.concat([rows, pd.DataFrame([run(seed)])], ignore_index=True)
        rows.to_csv(csv, index=False)
    return rows
