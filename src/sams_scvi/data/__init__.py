"""Bundled datasets and the perturbation field."""

from ._datasets import papalexi2021_eccite, schraivogel2020_tapseq
from ._perturbation_field import PerturbationField, parse_perturbations
from ._simulation import simulate_sams, simulate_sams_gaussian

__all__ = [
    "PerturbationField",
    "papalexi2021_eccite",
    "parse_perturbations",
    "schraivogel2020_tapseq",
    "simulate_sams",
    "simulate_sams_gaussian",
]
