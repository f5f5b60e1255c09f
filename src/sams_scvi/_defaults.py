"""Default settings shared by the module, the models, the training plan and the command line (one home each)."""

#: Latent dimension K of the models (the paper's is 100 on Replogle; 32 trains faster and loses nothing on the
#: bundled screens, ``docs/model.md``).
N_LATENT = 32
#: Width and depth of the encoder and decoder trunks (the paper's).
N_HIDDEN = 400
N_LAYERS = 1
#: Monte-Carlo particles per training step (the paper's).
N_PARTICLES = 5
#: The recipe's axis alignment: a rotated shift entry at least this fraction of its perturbation's largest
#: restarts its mask on, with logit +ALIGN_MASK_LOGIT (off: -ALIGN_MASK_LOGIT).
ALIGN_THRESHOLD = 0.3
ALIGN_MASK_LOGIT = 8.0
#: The simple predictors every evaluation can score beside a model (``sams_scvi.metrics.baseline_ate``).
BASELINES = ("control", "additive", "mean_perturbed")
#: The numeric columns ``screen_combinations`` can rank the pairs by (largest first).
SCREEN_RANKS = ("effect_norm", "non_additivity_norm", "n_credible_effect", "n_credible_non_additive")
