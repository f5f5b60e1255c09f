"""Counterfactual predictions and average treatment effects of a trained model."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse, stats
from scvi import settings
from scvi.utils import track

from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi.module._sampling import accumulate_log_normalized

from ._convergence import warn_if_unsettled
from ._utils import _as_positions, _check_number, _check_positive, _seeded

_ATE_TARGET_SUM = 1e4
# values decoded per ATE chunk: on CPU small enough to stay in cache and reuse allocations (decoding 2,500
# samples at the Replogle shape takes 2.1 s per 78 samples in chunks of 2**26 values, 0.8 s in chunks of 2**21);
# on a GPU large enough to fill it
_ATE_CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**26}
# samples decoded per draw of the globals block (a block holds as many posterior draws as fit; Replogle shape: 2.3
# ms per sample one chunk of 2 samples at a time, 2.1-2.2 ms in blocks of 4-16, 2.8 ms in blocks of 32)
_ATE_BLOCK_SAMPLES = 8
# most bytes of one block's per-draw sums (draws x 2 halves x conditions x genes, float64)
_ATE_BLOCK_BYTES = 2**28
# most values predict_perturbation decodes in one tensor (2**33 float32: 32 GiB); above that it asks for fewer samples
_PREDICT_MAX_VALUES = 2**33


class PredictionMixin:
    """Counterfactual expression (``predict_perturbation``) and average treatment effects (``estimate_ate``)."""

    @torch.inference_mode()
    def predict_perturbation(
        self,
        perturbations: Sequence[str] | None = None,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        expression: Literal["normalized", "counts", "log1p"] = "normalized",
        target_sum: float = 1e4,
        n_samples: int = 20,
        batch_size: int | None = None,
        seed: int | None = 0,
        progress_bar: bool = True,
    ) -> AnnData:
        """Counterfactual expression of source cells under chosen perturbations.

        Each source cell's basal state is inferred from its counts (and its own perturbation), then every
        requested perturbation's shift :math:`d (M \\odot E)` is applied and decoded. With ``penetrance``, the
        source cell's own response is inferred too, and each requested perturbation acts with probability
        :math:`\\pi_t` per draw. Combinations never
        observed in training are allowed as long as their atomic perturbations were seen.

        Parameters
        ----------
        perturbations
            Labels to apply, e.g. ``["A", "A+B", "control"]``. Default: the control label followed by every
            label observed in the training data.
        adata
            Data holding the source cells; default, the registered AnnData.
        indices
            Source cells (positions in ``adata``). Default: the control cells.
        expression
            ``"normalized"``: posterior mean of the expression proportions times ``target_sum`` (as after
            :func:`scanpy.pp.normalize_total`; with ``likelihood="normal"``, the posterior mean on the data's own
            scale). ``"counts"``: one posterior-predictive draw (negative binomial, or normal) at
            the source cell's observed library size, from one of ``n_samples`` posterior samples of the globals
            and the basal state chosen at random for each cell. ``"log1p"``: that draw put on the scale scanpy gives observed
            cells, ``log(1 + target_sum * x / sum(x))`` (:func:`scanpy.pp.normalize_total` then
            :func:`scanpy.pp.log1p`): the input cell-eval's ``MetricsEvaluator`` expects, with the cell-to-cell
            noise of real cells (a posterior mean has none, which inflates DE calls and distances); see
            :func:`sams_scvi.tl.prediction_pair`. Negative-binomial models only.
        target_sum
            Total per cell for ``"normalized"`` and ``"log1p"``.
        n_samples
            Posterior samples (of the globals and of the basal state): averaged for ``"normalized"``, one per
            cell picked from them for ``"counts"`` and ``"log1p"``.
        batch_size
            Source cells per minibatch.
        seed
            Seed of the sampling (``None``: do not reseed); the global random state is left untouched.
        progress_bar
            Show a progress bar.

        Returns
        -------
        AnnData with one row per (source cell, perturbation): ``obs_names`` ``"<cell>_<label>"``, the source
        cell's ``obs`` columns with ``obs[perturbation_key]`` set to the applied label (same delimiter and
        control label as the training data, so scanpy and pertpy read it directly), ``obs["source_cell"]``,
        and ``var`` of the source data.
        """
        if expression not in ("normalized", "counts", "log1p"):
            raise ValueError("`expression` must be 'normalized', 'counts' or 'log1p'.")
        self._check_if_trained(warn=False)
        if expression == "log1p" and self.module.likelihood == "normal":
            raise ValueError("expression='log1p' needs counts; a model with likelihood='normal' predicts its data's scale.")
        adata = self._validate_anndata(adata)
        state = self._perturbation_state
        perturbation_key = self.registry_["setup_args"]["perturbation_key"]
        if perturbations is None:
            perturbations = [state["control_value"], *state["observed_labels"]]
        perturbations = _as_labels(perturbations)
        if len(perturbations) == 0:
            raise ValueError("`perturbations` is empty.")
        _check_positive("n_samples", n_samples, integer=True)
        _check_positive("target_sum", target_sum)
        if batch_size is not None:
            _check_positive("batch_size", batch_size, integer=True)
        target_design = self._design_for(perturbations)  # (P, T)
        indices = _as_positions(adata, indices)
        if indices is None:
            # the control cells of the AnnData passed (not of the registered one)
            design = self.get_anndata_manager(adata, required=True).get_from_registry(
                SAMS_REGISTRY_KEYS.PERTURBATION_KEY
            )
            indices = np.flatnonzero(np.asarray(sparse.csr_matrix(design).getnnz(axis=1)) == 0)
            if len(indices) == 0:
                raise ValueError("`adata` has no control cells to use as source cells; pass `indices`.")
        if len(indices) == 0:
            raise ValueError("`indices` selects no cells.")
        n_draws = int(n_samples)
        # the largest tensors: the globals' samples (S, T, K) and a minibatch's decoded values (S, cells, P, G)
        cells_per_batch = min(len(indices), batch_size or settings.batch_size)
        n_values = n_draws * max(
            self.module.n_perturbations * self.module.n_latent,
            cells_per_batch * len(perturbations) * self.module.n_input,
        )
        if n_values > _PREDICT_MAX_VALUES:
            raise ValueError(
                f"n_samples={n_samples} would decode {n_values:.3g} values at once (n_samples x cells per minibatch x "
                f"perturbations x genes, about {4 * n_values / 2**30:.0f} GiB); lower n_samples (20 is the default), "
                "or batch_size."
            )

        blocks = []
        with _seeded(seed, self.device):
            globals_ = self.module.sample_globals(n_draws, with_kl=False)
            loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
            for tensors in track(loader, description="Predicting perturbations", disable=not progress_bar):
                out = self.module.infer_cells(tensors, globals_)
                shifts = self.module.sample_offset(target_design, globals_["shift"], n_cells=len(out["library"]))
                z = self.module.compose(out["z_basal"][:, :, None, :], shifts)  # (S, n, P, K)
                covariates = self.module.covariate_codes(tensors)
                if covariates is not None:
                    covariates = covariates[:, None, :].expand(-1, len(perturbations), -1)
                library = out["library"][:, None].expand(-1, len(perturbations))
                gen = self.module.generative(z, library, covariates, design=target_design)
                if expression in ("counts", "log1p"):
                    # Each cell's draw comes from its own posterior sample of the globals and of its basal state,
                    # so a predicted population carries the posterior's uncertainty, not one shared draw of (M, E).
                    counts = self.module.sample_observations(_one_draw_per_cell(gen, len(out["library"])))
                    values = counts if expression == "counts" else _log1p_normalize(counts, target_sum)
                elif self.module.likelihood == "normal":
                    values = gen["mean"].mean(0)
                else:
                    values = gen["rho"].mean(0) * target_sum
                blocks.append(values.reshape(-1, values.shape[-1]).cpu().numpy())

        columns = [c for c in adata.obs.columns if not str(c).startswith("_scvi")]
        obs = adata.obs.iloc[np.repeat(indices, len(perturbations))][columns].copy()
        obs["source_cell"] = obs.index.astype(str)
        labels = np.tile(np.asarray(perturbations, dtype=object), len(indices))
        obs[perturbation_key] = pd.Categorical(labels, categories=list(dict.fromkeys(perturbations)))
        obs.index = pd.Index([f"{c}_{p}" for c, p in zip(obs["source_cell"], labels, strict=True)])
        var = pd.DataFrame(index=self._gene_names.copy())
        return AnnData(
            X=np.concatenate(blocks).astype(np.float32),
            obs=obs,
            var=var,
            uns={
                "sams_scvi": {
                    "perturbation_key": perturbation_key,
                    "control_value": state["control_value"],
                    "delimiter": state["delimiter"],
                    "expression": expression,
                    "n_samples": n_draws,
                }
            },
        )

    @torch.inference_mode()
    def estimate_ate(
        self,
        perturbations: Sequence[str] | None = None,
        n_samples: int = 2500,
        library_size: float | Literal["median"] = "median",
        basal: Literal["prior", "control"] = "prior",
        credible_level: float = 0.9,
        n_posterior_draws: int = 100,
        batch_size: int = 250,
        seed: int | None = 0,
        progress_bar: bool = True,
    ) -> AnnData:
        r"""Average treatment effects of perturbations against the control, on the paper's scale, with credible intervals.

        For each posterior sample of the globals, a basal state is drawn, shifted by each condition's
        :math:`d\,(M \odot E)` (with ``penetrance``, each perturbation acting with probability :math:`\pi_t`),
        decoded, and counts are drawn at a fixed library size; each sample is put on the
        scale :math:`y = \log_2(1 + 10^4 x / \sum_g x_g)`, and
        :math:`\mathrm{ATE}_t = \bar y_t - \bar y_{\mathrm{control}}`. The basal state comes from

        * ``basal="prior"`` (the paper's estimator): :math:`z_b \sim N(0, I)`, drawn afresh for the control and
          for each perturbation; registered covariates are marginalised over the registered cells;
        * ``basal="control"``: :math:`z_b \sim q(z_b \mid x_i)` of a random registered control cell :math:`i`,
          shared by the control and every perturbation of that sample (a paired counterfactual of the observed
          control population, with that cell's covariates). It reads the effect where the control cells
          actually lie rather than where the prior puts them; see ``docs/model.md``.

        **Uncertainty.** The samples come in ``n_posterior_draws`` groups that share one draw of the globals
        :math:`(M, E) \sim q`. The ATE given one draw, :math:`\mathrm{ATE}_t(M, E)`, varies over draws with the
        posterior variance :math:`V_t`; the Monte-Carlo noise within a draw does not enter it: :math:`V_t` is the
        covariance, over draws, of the ATEs of the two halves of each group, whose Monte-Carlo noise is independent.
        The credible interval is :math:`\mathrm{ATE}_t \pm z \sqrt{V_t + \mathrm{se}_t^2}` (normal approximation,
        with the Monte-Carlo error :math:`\mathrm{se}_t` of the estimate). It describes the uncertainty of the
        mechanism :math:`(M, E)`, not of the networks (point estimates) or of the penetrance: on a simulation it
        covers far less than its nominal rate (``docs/discovery.md``); :func:`~sams_scvi.ensemble_ate` covers.
        ``layers["mc_se"]`` is the Monte-Carlo error of the ATE itself, which more posterior draws shrink (it is at
        least about :math:`\sqrt{V_t / \text{draws}}`); ``posterior_sd`` does not shrink with them.

        Parameters
        ----------
        perturbations
            Labels to evaluate (observed or unseen combinations of known perturbations). Default: every
            non-control label observed in the training data.
        n_samples
            Monte-Carlo samples (2,500 in the paper; at least 4), rounded down to a multiple of the posterior draws.
        library_size
            Library size of the sampled counts: ``"median"``, the median library of the registered cells, or a
            number. The effects a user holds against data are measured on cells of that depth, whose counts carry
            its sampling noise; the paper's estimator samples at ``1e4``, which on shallow screens predicts
            smaller effects than the data show (held-out slope 0.28 against 0.33 on TAP-seq, ``docs/model.md``).
        basal
            Where the basal states come from: ``"prior"`` or ``"control"`` (above).
        credible_level
            Posterior probability of the credible intervals, in (0, 1).
        n_posterior_draws
            Draws of the globals (at least 2, at most ``n_samples // 2``: each needs two samples).
        batch_size
            Most samples decoded per chunk; fewer when ``batch_size x (perturbations + 1) x genes`` would exceed
            about 2 million values on CPU (cache-sized chunks are fastest there) or 67 million on a GPU.
        seed
            Seed of the sampling (``None``: do not reseed); the global random state is left untouched.
        progress_bar
            Show a progress bar.

        Returns
        -------
        AnnData (perturbations x genes): ``X`` the ATE; ``layers`` ``"mc_se"`` (its Monte-Carlo standard error),
        ``"posterior_sd"``, ``"ci_lower"`` and ``"ci_upper"``; ``obs["n_cells"]`` the number of registered cells with
        that label (0 for unseen combinations); ``uns["control"]``, ``uns["credible_level"]``. ``ate.to_df()``
        gives the table. With ``likelihood="normal"`` the ATE is on the data's own scale: the difference of the
        decoded means (the expectation over the noise), and ``library_size`` is not used.
        """
        self._check_if_trained(warn=False)
        warn_if_unsettled(self, "estimate_ate")
        state = self._perturbation_state
        if perturbations is None:
            perturbations = list(state["observed_labels"])
        perturbations = _as_labels(perturbations)
        _check_number("credible_level", credible_level)
        if not 0 < credible_level < 1:
            raise ValueError("`credible_level` must lie strictly between 0 and 1, e.g. 0.9.")
        estimate = self._ate_posterior(
            perturbations, None, n_samples, n_posterior_draws, library_size, basal, batch_size, seed, progress_bar
        )
        half_width = stats.norm.ppf(0.5 + credible_level / 2) * np.hypot(estimate["posterior_sd"], estimate["mc_se"])
        n_cells = self._label_counts()
        obs = pd.DataFrame(
            {"n_cells": [int(n_cells.get(p, 0)) for p in perturbations]},
            index=pd.Index(perturbations, name="perturbation"),
        )
        ate = estimate["ate"]
        return AnnData(
            X=ate.astype(np.float32),
            obs=obs,
            var=pd.DataFrame(index=self._gene_names.copy()),
            layers={
                "mc_se": estimate["mc_se"].astype(np.float32),
                "posterior_sd": estimate["posterior_sd"].astype(np.float32),
                "ci_lower": (ate - half_width).astype(np.float32),
                "ci_upper": (ate + half_width).astype(np.float32),
            },
            uns={
                "control": state["control_value"],
                "n_samples": estimate["n_samples"],
                "n_posterior_draws": estimate["n_draws"],
                "credible_level": credible_level,
                **({} if self.module.likelihood == "normal" else {"library_size": estimate["library_size"]}),
                "basal": basal,
                "scale": "data" if self.module.likelihood == "normal" else "log2(1 + 1e4 * x / sum(x))",
            },
        )

    @torch.inference_mode()
    def screen_combinations(
        self,
        pairs: Sequence[str] | Sequence[tuple[str, str]] | None = None,
        rank_by: str = "non_additivity_norm",
        n_samples: int = 1000,
        n_posterior_draws: int = 50,
        library_size: float | Literal["median"] = "median",
        basal: Literal["prior", "control"] = "prior",
        credible_level: float = 0.9,
        batch_size: int = 250,
        seed: int | None = 0,
        progress_bar: bool = True,
    ) -> AnnData:
        r"""Predict untested pairs of perturbations and rank them by how far they depart from additivity.

        For each pair :math:`(a, b)` the model's ATE of the combination, :math:`\mathrm{ATE}_{ab}`, is compared with
        the expression-space additive expectation from its own singles, :math:`\mathrm{ATE}_a + \mathrm{ATE}_b`.
        SAMS-VAE adds the shifts in latent space; the decoder's nonlinearity makes the effects on expression
        non-additive, :math:`\mathrm{NA}_{ab} = \mathrm{ATE}_{ab} - \mathrm{ATE}_a - \mathrm{ATE}_b` (buffering or
        synergy). All three are estimated from the same posterior draws, so their credible intervals (see
        :meth:`estimate_ate`) account for the shared uncertainty of the singles.

        Parameters
        ----------
        pairs
            Pairs to screen, as labels (``"A+B"``, with the training data's delimiter) or tuples. Default: every
            pair of perturbations seen in training that no registered cell carries together.
        rank_by
            Column of the returned ``obs`` to sort by, largest first.
        n_samples, n_posterior_draws, library_size, basal, credible_level, batch_size, seed, progress_bar
            As in :meth:`estimate_ate` (fewer samples by default: one run decodes every pair and single).

        Returns
        -------
        AnnData (pairs x genes), rows ranked by ``rank_by``: ``X`` the pair's predicted ATE; ``layers``
        ``"ci_lower"``, ``"ci_upper"``, ``"posterior_sd"``, ``"mc_se"``, ``"additive"`` (the model's
        :math:`\mathrm{ATE}_a + \mathrm{ATE}_b`), ``"non_additivity"`` with its ``_lower``, ``_upper``,
        ``_posterior_sd`` and ``_mc_se``; ``obs`` the ranking table:
        ``perturbation_a``, ``perturbation_b``, ``effect_norm`` and ``non_additivity_norm`` (root mean square over
        genes), ``n_credible_effect`` and ``n_credible_non_additive`` (genes whose interval excludes 0),
        ``top_gene`` and ``top_non_additive_gene`` (largest absolute value).
        """
        self._check_if_trained(warn=False)
        check_rank_by(rank_by)
        warn_if_unsettled(self, "screen_combinations")
        state = self._perturbation_state
        delimiter = state["delimiter"]
        pairs = self._screen_pairs(pairs)
        _check_number("credible_level", credible_level)
        if not 0 < credible_level < 1:
            raise ValueError("`credible_level` must lie strictly between 0 and 1, e.g. 0.9.")
        singles = list(dict.fromkeys(atom for pair in pairs for atom in pair))
        labels = [f"{a}{delimiter}{b}" for a, b in pairs]
        conditions = labels + singles
        position = {label: i for i, label in enumerate(conditions)}
        n_pairs = len(pairs)
        contrasts = np.zeros((2 * n_pairs, len(conditions)))
        for i, (a, b) in enumerate(pairs):
            contrasts[i, i] = 1.0  # the pair's ATE
            contrasts[n_pairs + i, [i, position[a], position[b]]] = [1.0, -1.0, -1.0]  # its non-additivity
        estimate = self._ate_posterior(
            conditions, contrasts, n_samples, n_posterior_draws, library_size, basal, batch_size, seed, progress_bar
        )
        ate, non_additivity = np.split(estimate["ate"], 2)
        posterior_sd, non_additivity_sd = np.split(estimate["posterior_sd"], 2)
        mc_se, non_additivity_mc_se = np.split(estimate["mc_se"], 2)
        uns = {
            "control": state["control_value"],
            "n_samples": estimate["n_samples"],
            "n_posterior_draws": estimate["n_draws"],
            "basal": basal,
            **({} if self.module.likelihood == "normal" else {"library_size": estimate["library_size"]}),
        }
        return screen_table(
            pairs,
            labels,
            self._gene_names,
            {
                "": (ate, posterior_sd, mc_se),
                "non_additivity_": (non_additivity, non_additivity_sd, non_additivity_mc_se),
            },
            stats.norm.ppf(0.5 + credible_level / 2),
            rank_by,
            {**uns, "credible_level": credible_level},
        )

    def _screen_pairs(self, pairs) -> list[tuple[str, str]]:
        """Pairs as (a, b) tuples of known perturbations; default, seen ones never registered together."""
        state = self._perturbation_state
        delimiter, vocabulary = state["delimiter"], list(state["vocabulary"])
        if pairs is None and state.get("encode_combinations", "additive") != "additive":
            raise ValueError(
                "This model encodes each combination as a treatment of its own (encode_combinations="
                f"{state['encode_combinations']!r}): it cannot predict untested pairs. Screen with SAMSVAE."
            )
        if pairs is None:
            seen = [p for p, n in zip(vocabulary, self.module.train_perturbation_counts.tolist(), strict=True) if n > 0]
            together = set()
            for label in state["observed_labels"]:
                atoms = sorted({a.strip() for a in str(label).split(delimiter)})
                together.update((a, b) for i, a in enumerate(atoms) for b in atoms[i + 1 :])
            pairs = [(a, b) for i, a in enumerate(seen) for b in seen[i + 1 :] if tuple(sorted((a, b))) not in together]
            if not pairs:
                raise ValueError(
                    "Every pair of the perturbations seen in training was observed together; pass `pairs`."
                )
            return pairs
        if isinstance(pairs, str):
            pairs = [pairs]
        parsed = []
        for pair in pairs:
            atoms = [a.strip() for a in pair.split(delimiter)] if isinstance(pair, str) else [str(a) for a in pair]
            if len(atoms) != 2 or atoms[0] == atoms[1]:
                raise ValueError(
                    f"{pair!r} is not a pair of two different perturbations; write pairs as 'A{delimiter}B' or ('A', 'B')."
                )
            unknown = [a for a in atoms if a not in vocabulary]
            if unknown:
                raise ValueError(f"Unknown perturbations {unknown}; the model knows {vocabulary[:10]}...")
            parsed.append((atoms[0], atoms[1]))
        if not parsed:
            raise ValueError("`pairs` is empty.")
        seen, unique = set(), []
        for pair in parsed:  # A+B and B+A are one pair: keep its first spelling
            if frozenset(pair) not in seen:
                seen.add(frozenset(pair))
                unique.append(pair)
        if len(unique) < len(parsed):
            warnings.warn(
                f"`pairs` names {len(parsed) - len(unique)} pairs more than once (A{delimiter}B and B{delimiter}A are "
                "the same pair); each pair is screened once, under its first spelling.",
                UserWarning,
                stacklevel=4,  # the caller of screen_combinations (through inference_mode)
            )
        return unique

    def _ate_posterior(
        self,
        perturbations: list[str],
        contrasts: np.ndarray | None,
        n_samples: int,
        n_posterior_draws: int,
        library_size: float | str,
        basal: str,
        batch_size: int,
        seed: int | None,
        progress_bar: bool,
    ) -> dict:
        """ATEs of ``perturbations`` (or of their linear ``contrasts``, (Q, P)), with their errors (Q, G) arrays.

        Returns ``ate``, ``mc_se``, ``posterior_sd``, ``n_samples`` (used), ``n_draws`` and ``library_size``;
        see :meth:`estimate_ate`.
        """
        _check_positive("batch_size", batch_size, integer=True)
        batch_size = int(batch_size)
        state = self._perturbation_state
        if state["n_control_cells"] == 0:
            raise ValueError(
                "The training data has no control cells: the ATE compares each perturbation with the unperturbed "
                "(control) state, which the model can only learn from control cells. Register data with cells "
                f"labelled {state['control_value']!r}."
            )
        if len(perturbations) == 0:
            raise ValueError("`perturbations` is empty.")
        if basal not in ("prior", "control"):
            raise ValueError("`basal` must be 'prior' or 'control'.")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 4:
            raise ValueError(f"`n_samples` must be an integer of at least 4, not {n_samples!r}.")
        if isinstance(n_posterior_draws, bool) or not isinstance(n_posterior_draws, int | np.integer):
            raise ValueError("`n_posterior_draws` must be a positive integer.")
        if n_posterior_draws < 1:
            raise ValueError("`n_posterior_draws` must be a positive integer.")
        design = self._design_for([state["control_value"], *perturbations])  # (P + 1, T), control first
        library = self._ate_library_size(library_size) if self.module.likelihood == "nb" else 1.0
        n_outputs = len(perturbations) if contrasts is None else len(contrasts)
        n_conditions, n_genes = design.shape[0], self.module.n_input
        n_draws = int(min(n_posterior_draws, n_samples // 2))
        if n_draws < 2:
            raise ValueError(
                "The ATE's uncertainty needs at least 2 posterior draws of 2 samples each: pass n_posterior_draws >= 2 "
                f"and n_samples >= 4 (got {n_posterior_draws} and {n_samples})."
            )
        per_draw = n_samples // n_draws
        halves = (per_draw // 2, per_draw - per_draw // 2)
        # half h of draw j holds the samples [j * per_draw + bounds[h], j * per_draw + bounds[h + 1])
        bounds = (0, halves[0], per_draw)

        device = self.device
        # a contrast row reads a few conditions: sparse, so that screening thousands of pairs stays linear in them
        contrast = None if contrasts is None else _sparse_contrast(contrasts, device)
        totals = {
            name: torch.zeros(n_outputs, n_genes, dtype=torch.float64, device=device)
            for name in ("sum", "sum_sq", "sum_a", "sum_b", "sum_ab")
        }
        scratch = torch.zeros(n_conditions - 1, n_genes, dtype=torch.float64, device=device)
        # memory-bounded: decoded in chunks of at most ~2**21 (CPU: cache-sized) or ~2**26 (GPU, 256 MB per float32
        # tensor) values; the globals for a block of several draws at once (fewer small tensor operations)
        chunk_elements = _ATE_CHUNK_ELEMENTS.get(device.type, _ATE_CHUNK_ELEMENTS["cuda"])
        per_chunk = max(1, min(batch_size, chunk_elements // (n_conditions * n_genes)))
        draws_per_block = max(1, (per_chunk * max(1, _ATE_BLOCK_SAMPLES // per_chunk)) // per_draw)
        # the block's per-draw sums are (draws, 2, conditions, genes) float64: cap them for genome-wide screens
        draws_per_block = max(1, min(draws_per_block, _ATE_BLOCK_BYTES // (2 * n_conditions * n_genes * 8)))
        blocks = [min(draws_per_block, n_draws - start) for start in range(0, n_draws, draws_per_block)]
        with _seeded(seed, device):
            # inside the seeded block: the encoder's draws must not advance the caller's random state
            control_posterior = self._control_basal_posterior() if basal == "control" else None
            for block_draws in track(blocks, description="Estimating ATEs", disable=not progress_bar):
                globals_ = self.module.sample_globals(block_draws, with_kl=False)
                offset = self.module.sample_offset(design, globals_["shift"], n_cells=per_draw)
                offset = offset.reshape(block_draws * per_draw, n_conditions, -1)  # per draw, its samples in a row
                block = offset.shape[0]
                if control_posterior is None:
                    z = self.module.compose(torch.randn_like(offset), offset)
                    covariates = self._sample_covariates((block, n_conditions))
                else:
                    z, covariates = self._control_basal_draws(control_posterior, offset)
                half_sums = torch.zeros(block_draws, 2, n_conditions, n_genes, dtype=torch.float64, device=device)
                library_sizes = torch.full((per_chunk, n_conditions), library, device=device)
                for start in range(0, block, per_chunk):
                    stop = min(start + per_chunk, block)
                    gen = self.module.generative(
                        z[start:stop],
                        library_sizes[: stop - start],
                        None if covariates is None else covariates[start:stop],
                        design=design,
                    )
                    for draw, half, lo, hi in _half_segments(start, stop, per_draw, bounds):
                        if self.module.likelihood == "normal":
                            _accumulate_means(gen["mean"][lo - start : hi - start], half_sums[draw, half], scratch)
                        else:
                            mu = gen["mu"][lo - start : hi - start]
                            accumulate_log_normalized(mu, gen["theta"], _ATE_TARGET_SUM, half_sums[draw, half], scratch)
                means = half_sums.div_(torch.tensor(halves, dtype=torch.float64, device=device)[None, :, None, None])
                effects = _apply_contrast(contrast, means[:, :, 1:] - means[:, :, :1])  # (draws, 2, Q, G)
                del means, half_sums
                weights = [h / per_draw for h in halves]
                draw_effect = effects[:, 0] * weights[0] + effects[:, 1] * weights[1]  # (draws, Q, G)
                totals["sum"] += draw_effect.sum(0)
                totals["sum_sq"] += draw_effect.square_().sum(0)
                del draw_effect
                totals["sum_a"] += effects[:, 0].sum(0)
                totals["sum_b"] += effects[:, 1].sum(0)
                totals["sum_ab"] += effects[:, 0].mul_(effects[:, 1]).sum(0)
        correction = n_draws / (n_draws - 1) if n_draws > 1 else np.nan
        ate = totals["sum"] / n_draws
        draw_variance = (totals["sum_sq"] / n_draws - ate.square()).clamp(min=0) * correction
        covariance = (totals["sum_ab"] / n_draws - totals["sum_a"] * totals["sum_b"] / n_draws**2) * correction
        return {
            "ate": ate.cpu().numpy(),
            "mc_se": (draw_variance / n_draws).sqrt().cpu().numpy(),
            "posterior_sd": covariance.clamp(min=0).sqrt().cpu().numpy(),
            "n_samples": n_draws * per_draw,
            "n_draws": n_draws,
            "library_size": float(library),
        }

    @torch.inference_mode()
    def _control_basal_posterior(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Location and scale of :math:`q(z_b \\mid x_i)` (n_control, K) of the control cells, and their covariates.

        A control cell has no offset, so its basal posterior does not depend on the globals. The covariate codes
        are ``None`` when the decoder has no covariates.
        """
        if self.adata is None:
            raise ValueError("basal='control' needs the registered AnnData (its control cells).")
        design = sparse.csr_matrix(self.adata_manager.get_from_registry(SAMS_REGISTRY_KEYS.PERTURBATION_KEY))
        controls = np.flatnonzero(design.getnnz(axis=1) == 0)
        globals_ = self.module.point_globals()
        locs, scales, codes = [], [], []
        for tensors in self._make_data_loader(adata=self.adata, indices=controls, batch_size=1024):
            out = self.module.inference(**self.module._get_inference_input(tensors), global_samples=globals_)
            qz = out["qz"]
            scale = qz.scale if qz.scale.dim() == 2 else qz.scale[0]
            locs.append(self.module.basal_mean(out)[0])
            scales.append(scale)
            covariates = self.module.covariate_codes(tensors)
            if covariates is not None and not self.module.decoder_covariates.is_empty:
                codes.append(covariates.to(scale.device))  # the loader's tensors stay on the CPU
        return torch.cat(locs), torch.cat(scales), (torch.cat(codes) if codes else None)

    def _control_basal_draws(
        self,
        control_posterior: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        offset: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per sample, one random control cell's :math:`z_b \\sim q(z_b \\mid x_i)` plus each condition's offset.

        Returns the latents (S, P, K) and that cell's covariates (S, P, J) or ``None``.
        """
        loc, scale, codes = control_posterior
        cells = torch.randint(loc.shape[0], (offset.shape[0],), device=loc.device)
        basal = torch.randn_like(loc[cells]).mul_(scale[cells]).add_(loc[cells])
        z = self.module.compose(basal[:, None, :], offset)
        covariates = None if codes is None else codes[cells][:, None, :].expand(-1, offset.shape[1], -1)
        return z, covariates

    def _ate_library_size(self, library_size: float | str) -> float:
        if library_size == "median":
            if self.adata is None:
                raise ValueError("library_size='median' needs the registered AnnData.")
            x = self.adata_manager.get_from_registry(SAMS_REGISTRY_KEYS.X_KEY)
            return float(np.median(_row_sums(x)))
        if isinstance(library_size, str):
            raise ValueError(f"`library_size` must be a positive number or 'median', not {library_size!r}.")
        _check_positive("library_size", library_size)
        return float(library_size)

    def _label_counts(self) -> pd.Series:
        """Registered cells per label (empty when the model was loaded without data)."""
        key = self.registry_["setup_args"]["perturbation_key"]
        if self.adata is None or key not in self.adata.obs:
            return pd.Series(dtype=int)
        return self.adata.obs[key].astype(str).str.strip().value_counts()


SCREEN_RANKS = ("effect_norm", "non_additivity_norm", "n_credible_effect", "n_credible_non_additive")


def check_rank_by(rank_by: str) -> None:
    """Raise before any sampling when ``rank_by`` is not a numeric column of the screen's table."""
    if rank_by not in SCREEN_RANKS:
        raise ValueError(f"`rank_by` must be one of {list(SCREEN_RANKS)}, not {rank_by!r}.")


def screen_table(
    pairs: list[tuple[str, str]],
    labels: list[str],
    genes: pd.Index,
    estimates: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    quantile: float,
    rank_by: str,
    uns: dict,
) -> AnnData:
    """The AnnData of :meth:`PredictionMixin.screen_combinations`, ranked by ``rank_by``.

    ``estimates`` maps ``""`` (the pairs' ATEs) and ``"non_additivity_"`` to (value, sd, Monte-Carlo se), each
    (pairs, genes); intervals are value ± ``quantile`` x sqrt(sd² + se²).
    """
    ate, sd, mc_se = estimates[""]
    non_additivity, non_additivity_sd, non_additivity_mc_se = estimates["non_additivity_"]
    width = quantile * np.hypot(sd, mc_se)
    non_additivity_width = quantile * np.hypot(non_additivity_sd, non_additivity_mc_se)
    obs = pd.DataFrame(
        {
            "perturbation_a": [a for a, _ in pairs],
            "perturbation_b": [b for _, b in pairs],
            "effect_norm": np.sqrt(np.mean(ate**2, axis=1)),
            "non_additivity_norm": np.sqrt(np.mean(non_additivity**2, axis=1)),
            "n_credible_effect": (np.abs(ate) > width).sum(1),
            "n_credible_non_additive": (np.abs(non_additivity) > non_additivity_width).sum(1),
            "top_gene": genes[np.abs(ate).argmax(1)],
            "top_non_additive_gene": genes[np.abs(non_additivity).argmax(1)],
        },
        index=pd.Index(labels, name="perturbation"),
    )
    check_rank_by(rank_by)
    order = np.argsort(-obs[rank_by].to_numpy(), kind="stable")
    layers = {
        "ci_lower": ate - width,
        "ci_upper": ate + width,
        "posterior_sd": sd,
        "mc_se": mc_se,
        "additive": ate - non_additivity,
        "non_additivity": non_additivity,
        "non_additivity_lower": non_additivity - non_additivity_width,
        "non_additivity_upper": non_additivity + non_additivity_width,
        "non_additivity_posterior_sd": non_additivity_sd,
        "non_additivity_mc_se": non_additivity_mc_se,
    }
    result = AnnData(
        X=ate.astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=genes.copy()),
        layers={name: np.asarray(value, dtype=np.float32) for name, value in layers.items()},
        uns={**uns, "rank_by": rank_by},
    )
    return result[order].copy()


def _half_segments(start: int, stop: int, per_draw: int, bounds: tuple[int, int, int]):
    """(draw, half, lo, hi) for every part of a draw's half within the block samples [start, stop)."""
    for draw in range(start // per_draw, (stop - 1) // per_draw + 1):
        for half in (0, 1):
            lo = max(start, draw * per_draw + bounds[half])
            hi = min(stop, draw * per_draw + bounds[half + 1])
            if lo < hi:
                yield draw, half, lo, hi


def _one_draw_per_cell(generative_outputs: dict, n_cells: int) -> dict:
    """Keep, for each cell, one of the posterior samples (dim 0) of the parameters shaped (S, n_cells, ...)."""
    n_draws = next(v.shape[0] for v in generative_outputs.values() if v.dim() >= 2)
    draw = torch.randint(n_draws, (n_cells,)).to(next(iter(generative_outputs.values())).device)
    cells = torch.arange(n_cells, device=draw.device)
    return {
        key: value[draw, cells] if value.dim() >= 2 and tuple(value.shape[:2]) == (n_draws, n_cells) else value
        for key, value in generative_outputs.items()
    }


def _log1p_normalize(counts: torch.Tensor, target_sum: float) -> torch.Tensor:
    """``log(1 + target_sum * x / sum(x))`` per row (0 for a row without counts), as scanpy normalises cells."""
    return torch.log1p(counts * (target_sum / counts.sum(-1, keepdim=True).clamp(min=1)))


def _as_labels(perturbations) -> list[str]:
    """Perturbation labels as a list of strings, each once; a single string is one label, not its letters.

    Surrounding spaces are dropped, as the label parser drops them, so that outputs carry the registered label; a
    repeated label would give repeated rows and obs names.
    """
    if isinstance(perturbations, str):
        return [perturbations.strip()]
    return list(dict.fromkeys(str(p).strip() for p in perturbations))


def _row_sums(x) -> np.ndarray:
    """Per-cell totals of a count matrix: numpy, scipy sparse, or backed on disk (read a block of rows at a time)."""
    if isinstance(x, np.ndarray) or sparse.issparse(x):
        return np.asarray(x.sum(1)).ravel()
    step = 10_000
    return np.concatenate([np.asarray(x[start : start + step].sum(1)).ravel() for start in range(0, x.shape[0], step)])


def _sparse_contrast(contrasts: np.ndarray, device: torch.device) -> torch.Tensor:
    """A (Q, P) contrast matrix as a sparse float64 tensor on ``device``."""
    rows, columns = np.nonzero(contrasts)
    return torch.sparse_coo_tensor(
        torch.as_tensor(np.stack([rows, columns])),
        torch.as_tensor(np.asarray(contrasts, dtype=np.float64)[rows, columns]),
        size=contrasts.shape,
        device=device,
        check_invariants=True,  # small (nonzeros of a Q x P contrast); says so instead of a torch warning
    ).coalesce()


def _apply_contrast(contrast: torch.Tensor | None, effects: torch.Tensor) -> torch.Tensor:
    """``contrast @ effects`` over the conditions axis of ``effects`` (D, H, P, G) -> (D, H, Q, G); ``None``: as is."""
    if contrast is None:
        return effects
    d, h, p, g = effects.shape
    flat = effects.permute(2, 0, 1, 3).reshape(p, d * h * g)
    return torch.sparse.mm(contrast, flat).reshape(-1, d, h, g).permute(1, 2, 0, 3)


def _accumulate_means(mean: torch.Tensor, sums: torch.Tensor, diff_sq: torch.Tensor) -> None:
    """Add the sums over samples of decoded means (S, C, G) to ``sums`` and of squared contrasts to ``diff_sq``."""
    mean = mean.to(sums.dtype)
    sums += mean.sum(0)
    diff_sq += mean[:, 1:].sub(mean[:, :1]).square().sum(0)
