"""Tools that interpret a trained model's outputs (scanpy's ``tl``): gene-set enrichment of its gene programs."""

from ._enrichment import program_enrichment

__all__ = ["program_enrichment"]
