# %% [markdown]
# # Evaluating a perturbation model, against baselines and the paper's comparison models
#
# A held-out-combination split of the TAP-seq screen, SAMS-VAE and its comparison models trained on it, and the
# paper's metrics next to the simple baselines and the data's own noise ceiling. About ten minutes on a laptop CPU
# (`python tutorials/02_evaluation_and_models.py`); lower `EPOCHS` for a quicker look.

# %%
import scvi

import sams_scvi
from sams_scvi import metrics

EPOCHS = 100
scvi.settings.seed = 0
adata = sams_scvi.data.schraivogel2020_tapseq()

# %% [markdown]
# ## A combinatorial split
# `combination_split` keeps a fraction of the combinations for training and tests on cells of the others, whose
# single perturbations were all seen. The three arrays go straight into scvi-tools' data splitter.

# %%
train, validation, test = metrics.combination_split(
    adata, fraction=0.5, test_fraction=0.5, combination_test_fraction=0.5, seed=0
)
print(len(train), len(validation), len(test), "cells;", adata.obs["perturbation"].iloc[test].nunique(), "test labels")

# %% [markdown]
# ## How noisy is the data?
# Before comparing models: how well do two disjoint halves of the cells agree on each combination's effect?

# %%
labels = adata.obs["perturbation"].astype(str)
testable = [p for p in labels.iloc[test].unique() if (labels == p).sum() >= 2]
metrics.split_half_ceiling(adata, testable, seed=0)

# %% [markdown]
# ## Every model of the paper, the same way
# `compare_models` sets each model up on a copy of the data, trains it on the split with the same seed and scores
# the held-out cells; the baselines come as extra rows. SVAE+ uses unique encoding of combinations, so it cannot
# extrapolate to unseen ones (it warns about that).

# %%
table = sams_scvi.compare_models(adata, [train, validation, test], max_epochs=EPOCHS)
table[["iwelbo", "pearson", "pearson_top20", "r2", "train_seconds"]].round(3)

# %% [markdown]
# ## One model, per perturbation
# `evaluate` gives the same metrics for any trained model, pooled per subset or per perturbation.

# %%
sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
model = sams_scvi.SAMSVAE(adata)
model.train(max_epochs=EPOCHS, datasplitter_kwargs={"external_indexing": [train, validation, test]})
per_perturbation = sams_scvi.evaluate(model, adata, subsets=["test"], per_perturbation=True)
per_perturbation.sort_values("observed_norm", ascending=False).head(10).round(3)

# %% [markdown]
# ## Where each effect goes
# `effect_decomposition` follows each perturbation's effect through the model on cells it did not train on (here
# the validation cells: singles and controls). `mechanism_fraction` is the share of the perturbed cells' latent
# shift that the global mechanism carries; the `slope_*` columns are the slope of predicted on observed effect
# after the likelihood fit (`fitted`), when the mechanism is applied to the control cells (`counterfactual`), and
# for both ATE estimators. A slope that drops between two stages shows where magnitude is lost.

# %%
decomposition = sams_scvi.metrics.effect_decomposition(model, indices=validation)
print(decomposition.attrs["pooled"].round(3))
decomposition.round(2)
