"""Bundled and downloadable datasets and the perturbation field."""

from ._combination_simulation import simulate_combinations
from ._datasets import papalexi2021_eccite, schraivogel2020_tapseq
from ._perturbation_field import PerturbationField, parse_perturbations
from ._public import norman2019, replogle2022_k562
from ._simulation import simulate_sams, simulate_sams_gaussian

__all__ = [
    "PerturbationField",
    "norman2019",
    "papalexi2021_eccite",
    "parse_perturbations",
    "replogle2022_k562",
    "schraivogel2020_tapseq",
    "simulate_combinations",
    "simulate_sams",
    "simulate_sams_gaussian",
]
