"""Over-representation of user-given gene sets among the genes a latent dimension moves."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd
from scipy import stats


def program_enrichment(
    programs: pd.DataFrame,
    gene_sets: Mapping[str, Iterable[str]],
    n_top_genes: int = 50,
    universe: Iterable[str] | None = None,
    min_overlap: int = 1,
) -> pd.DataFrame:
    """Hypergeometric test of each gene set among each latent dimension's top genes.

    Parameters
    ----------
    programs
        Output of :meth:`~sams_scvi.SAMSVAE.get_gene_programs` with every gene (``n_top_genes=None``) or at least
        ``n_top_genes`` per dimension: columns ``latent``, ``gene``, ``rank``.
    gene_sets
        Named gene sets, e.g. ``{"interferon": ["STAT1", "IRF1", ...]}``; genes outside the universe are ignored.
    n_top_genes
        Genes per dimension tested (the ``n_top_genes`` of largest absolute effect).
    universe
        Genes that could have been picked; default, every gene in ``programs`` (pass the model's genes when
        ``programs`` holds only the top genes).
    min_overlap
        Rows with fewer top genes in the set are dropped.

    Returns
    -------
    Tidy table, most significant first: ``latent``, ``gene_set``, ``overlap``, ``set_size`` (within the
    universe), ``expected`` (overlap under random picking), ``p_value`` (one-sided), ``fdr`` (Benjamini-Hochberg
    over all rows tested) and ``genes`` (the overlapping genes, comma-separated).
    """
    missing = {"latent", "gene", "rank"} - set(programs.columns)
    if missing:
        raise ValueError(f"`programs` lacks the columns {sorted(missing)}; pass the output of get_gene_programs.")
    if n_top_genes < 1:
        raise ValueError("`n_top_genes` must be a positive integer.")
    if not gene_sets:
        raise ValueError("`gene_sets` is empty.")
    # A set given as one string ({"s": "GATA1"}) is one gene, not its letters.
    gene_sets = {name: [genes] if isinstance(genes, str) else genes for name, genes in gene_sets.items()}
    universe = pd.Index(programs["gene"].unique() if universe is None else list(universe)).astype(str)
    n_universe = len(universe)
    rows = []
    for latent, group in programs.groupby("latent", sort=False, observed=True):
        top = set(group.loc[group["rank"] <= n_top_genes, "gene"].astype(str)) & set(universe)
        for name, genes in gene_sets.items():
            members = set(map(str, genes)) & set(universe)
            overlap = sorted(top & members)
            p_value = stats.hypergeom.sf(len(overlap) - 1, n_universe, len(members), len(top))
            rows.append(
                {
                    "latent": latent,
                    "gene_set": name,
                    "overlap": len(overlap),
                    "set_size": len(members),
                    "expected": len(top) * len(members) / max(n_universe, 1),
                    "p_value": float(p_value),
                    "genes": ",".join(overlap),
                }
            )
    table = pd.DataFrame(rows)
    table["fdr"] = stats.false_discovery_control(table["p_value"].to_numpy(), method="bh")
    table = table[table["overlap"] >= min_overlap]
    columns = ["latent", "gene_set", "overlap", "set_size", "expected", "p_value", "fdr", "genes"]
    return table.sort_values(["p_value", "latent"])[columns].reset_index(drop=True)
