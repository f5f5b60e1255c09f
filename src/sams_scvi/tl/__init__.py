"""Tools that interpret a trained model's outputs (scanpy's ``tl``).

Gene-set enrichment of its gene programs, and predicted and observed cells side by side for scverse's evaluation
tools.
"""

from ._enrichment import program_enrichment
from ._interop import prediction_pair

__all__ = ["prediction_pair", "program_enrichment"]
