# %% [markdown]
# # Quick start: SAMS-VAE on a TAP-seq CRISPRi screen
#
# Schraivogel et al. (2020) knocked down 14 targets in K562 cells and read out a 74-gene panel; 310 cells carry
# two to four targets. We train SAMS-VAE, look at its sparse mechanisms, and predict a combination that was never
# observed. Runs in a few minutes on a laptop CPU (`python tutorials/01_quickstart.py`).

# %%
import numpy as np
import scanpy as sc
import scvi

import sams_scvi

scvi.settings.seed = 0
adata = sams_scvi.data.schraivogel2020_tapseq()
adata.obs["perturbation"].value_counts().head(10)

# %% [markdown]
# ## Register and train
# Labels are `control`, a target (`CPQ`) or a combination (`CPQ+FAM83A`); `setup_anndata` turns them into a
# cells x targets design matrix. We keep the counts raw: the model's likelihood is negative binomial.

# %%
sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
model = sams_scvi.SAMSVAE(adata)
model.train(max_epochs=120, check_val_every_n_epoch=10)
model.history["elbo_validation"].tail()

# %% [markdown]
# ## Basal latent space
# The basal state removes each cell's perturbation shift, so perturbed and control cells overlap in it.
# We embed a 4,000-cell subsample (scanpy then computes exact neighbours).

# %%
latent = sc.AnnData(model.get_latent(), obs=adata.obs[["perturbation"]].copy())
latent = latent[np.random.default_rng(0).choice(latent.n_obs, 4000, replace=False)].copy()
sc.pp.neighbors(latent, use_rep="X")
sc.tl.umap(latent)
sc.pl.umap(latent, color="perturbation", legend_loc=None)

# %% [markdown]
# ## Sparse mechanisms: which latent dimensions each target moves

# %%
masks = model.get_mask_probabilities()
(masks > 0.5).sum(axis=1).sort_values(ascending=False)

# %% [markdown]
# ## Average treatment effects against the data

# %%
ate = model.estimate_ate()
observed = sams_scvi.metrics.observed_ate(adata)
singles = [p for p in observed.obs_names if "+" not in p]
print("ATE Pearson r, single targets:", sams_scvi.metrics.ate_pearson(ate, observed, perturbations=singles))
sams_scvi.pl.ate_scatter(ate[singles], observed[singles])

# %% [markdown]
# ## An unseen combination
# `DSCC1+MYC` never occurs in the data; its latent shift is the sum of the two learned sparse shifts.

# %%
pred = model.predict_perturbation(["control", "DSCC1", "MYC", "DSCC1+MYC"])
means = sc.get.aggregate(pred, by="perturbation", func="mean").to_df(layer="mean")
(np.log2(1 + means) - np.log2(1 + means.loc["control"])).T.sort_values("DSCC1+MYC").head(8)
