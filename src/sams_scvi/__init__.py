"""SAMS-VAE for single-cell perturbation screens, as an scvi-tools model.

The subpackages and the names below load on first use, so ``import sams_scvi`` and the command line start without
importing torch or scvi-tools.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import TYPE_CHECKING

__version__ = version("sams-scvi")

# public name -> the submodule that defines it
_LAZY = {
    "CPAVAE": ".model",
    "ConditionalVAE": ".model",
    "SAMSModule": ".module",
    "SAMSVAE": ".model",
    "SVAEPlus": ".model",
    "bootstrap_models": ".model",
    "compare_models": "._compare",
    "ensemble_ate": ".model",
    "ensemble_screen": ".model",
    "evaluate": ".metrics",
    "paper_models": "._compare",
}
_SUBPACKAGES = ("data", "hub", "metrics", "model", "module", "pl", "tl")

__all__ = [
    "CPAVAE",
    "ConditionalVAE",
    "SAMSModule",
    "SAMSVAE",
    "SVAEPlus",
    "bootstrap_models",
    "compare_models",
    "data",
    "ensemble_ate",
    "ensemble_screen",
    "evaluate",
    "metrics",
    "paper_models",
    "pl",
    "tl",
]

if TYPE_CHECKING:
    from . import data, metrics, pl, tl
    from ._compare import compare_models, paper_models
    from .metrics import evaluate
    from .model import CPAVAE, SAMSVAE, ConditionalVAE, SVAEPlus, bootstrap_models, ensemble_ate, ensemble_screen
    from .module import SAMSModule


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBPACKAGES})
