"""Gene-set enrichment of gene programs."""

from math import comb

import pandas as pd
import pytest

import sams_scvi


def test_program_enrichment_finds_a_planted_set():
    genes = [f"g{i}" for i in range(100)]
    rows = []
    for latent, top_genes in {"latent_0": genes[:10], "latent_1": genes[50:60]}.items():
        ranked = top_genes + [g for g in genes if g not in top_genes]
        rows += [{"latent": latent, "gene": g, "rank": r + 1, "effect": 1.0} for r, g in enumerate(ranked)]
    programs = pd.DataFrame(rows)
    table = sams_scvi.tl.program_enrichment(
        programs, {"planted": genes[:8] + ["not_a_gene"], "random": genes[20:40]}, n_top_genes=10
    )
    best = table.iloc[0]
    assert (best.latent, best.gene_set, best.overlap, best.set_size) == ("latent_0", "planted", 8, 8)
    # P(X >= 8) for 10 draws from 100 genes of which 8 are in the set
    assert best.p_value == pytest.approx(comb(92, 2) / comb(100, 10), rel=1e-6)
    assert best.fdr >= best.p_value and (table.fdr <= 1).all()
    assert set(table.gene_set) == {"planted"}  # rows without overlap are dropped
    with pytest.raises(ValueError, match="columns"):
        sams_scvi.tl.program_enrichment(programs.drop(columns="rank"), {"a": ["g1"]})
