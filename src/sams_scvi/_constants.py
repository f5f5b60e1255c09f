"""Registry keys shared by the model, the module and the fields."""

from typing import NamedTuple


class _SamsRegistryKeys(NamedTuple):
    X_KEY: str = "X"
    BATCH_KEY: str = "batch"
    CAT_COVS_KEY: str = "extra_categorical_covs"
    PERTURBATION_KEY: str = "perturbation"
    LABELS_KEY: str = "labels"  # the perturbation labels, as scvi-tools names them (its criticism groups by them)


#: Keys of the minibatch dictionary (and of the data registry) used by :mod:`sams_scvi`.
SAMS_REGISTRY_KEYS = _SamsRegistryKeys()
