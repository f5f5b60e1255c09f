"""Training recipes: the optimisation settings a model starts from (the objective is the same in every recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sams_scvi.model._schedule import ALIGN_AFTER_UPDATES


@dataclass(frozen=True)
class Recipe:
    """Initialisation of the module's free variational parameters and the training plan's settings.

    ``module["penetrance"]`` is the one modelling choice a recipe makes: whether perturbed cells may escape their
    perturbation (:class:`~sams_scvi.module.SAMSModule`); the paper's model is ``"reference"``'s.

    Parameters
    ----------
    description
        One line for the documentation.
    module
        Defaults of :class:`~sams_scvi.module.SAMSModule` (mechanism) arguments.
    plan
        Defaults of :class:`~sams_scvi.model.SAMSTrainingPlan` arguments.
    """

    description: str
    module: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)


SAMS_RECIPES = {
    "fast": Recipe(
        "masks start on (logit 3, q = 0.95) and the per-perturbation variational parameters learn 10x faster, so "
        "effects are carried by the mechanism from the first epochs; after 1,000 updates of a typical perturbation "
        "(or half way through a shorter run), the latent axes are rotated to where the shifts are sparsest, and the "
        "masks are set there (logits +-8) and held for the rest of training; cells may escape their perturbation "
        "(penetrance) "
        "(docs/model.md)",
        module={"mask_init_logit": 3.0, "penetrance": True},
        plan={
            "global_lr_factor": 10.0,
            "align_after_updates": ALIGN_AFTER_UPDATES,
            "align_mask_logit": 8.0,
            "mask_hold": None,
        },
    ),
    "reference": Recipe(
        "the authors' model and settings: every perturbed cell responds, mask logits start at 0 (q = 0.5), one "
        "learning rate for every parameter",
        module={"mask_init_logit": 0.0, "penetrance": False},
        plan={"global_lr_factor": 1.0, "align_after_updates": None},
    ),
}


def resolve_recipe(name: str, recipes: dict[str, Recipe] = SAMS_RECIPES) -> Recipe:
    """The recipe called ``name``; raise a clear error for an unknown one."""
    if name not in recipes:
        raise ValueError(f"Unknown recipe {name!r}; choose from {list(recipes)}.")
    return recipes[name]
