"""Average treatment effects with credible intervals (``estimate_ate``) and the combination screen built on them."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse, stats
from scvi.utils import track

from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi._defaults import SCREEN_RANKS
from sams_scvi._utils import _as_labels, _check_number, _check_positive, _seeded

from ._convergence import warn_if_unsettled

# values decoded per chunk: on CPU few enough to stay in cache, on a GPU enough to fill it (benchmarks/NOTES.md)
ATE_CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**26}
# samples decoded per block of globals (a block holds as many posterior draws as fit)
ATE_BLOCK_SAMPLES = 8
# most bytes of one block's per-draw sums (draws x 2 halves x conditions x genes, float64)
ATE_BLOCK_BYTES = 2**28


class TreatmentEffectMixin:
    """Average treatment effects (``estimate_ate``) and the screen of untested pairs (``screen_combinations``)."""

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
            smaller effects than the data show (held-out slope 0.32 against 0.36 on TAP-seq, 3 seeds,
            ``docs/results_fidelity.md``).
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
                **({"library_size": estimate["library_size"]} if self.module.px_class.has_counts else {}),
                "basal": basal,
                "scale": self.module.px_class.ate_scale,
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
            **({"library_size": estimate["library_size"]} if self.module.px_class.has_counts else {}),
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
        state = self._perturbation_state
        if state["n_control_cells"] + state.get("reference_control_cells", 0) == 0:
            raise ValueError(
                "The training data has no control cells: the ATE compares each perturbation with the unperturbed "
                "(control) state, which the model can only learn from control cells. Register data with cells "
                f"labelled {state['control_value']!r}."
            )
        if len(perturbations) == 0:
            raise ValueError("`perturbations` is empty.")
        if basal not in ("prior", "control"):
            raise ValueError("`basal` must be 'prior' or 'control'.")
        design = self._design_for([state["control_value"], *perturbations])  # (P + 1, T), control first
        library = self._ate_library_size(library_size) if self.module.px_class.has_counts else 1.0
        n_outputs = len(perturbations) if contrasts is None else len(contrasts)
        plan = _plan_ate(n_samples, n_posterior_draws, batch_size, design.shape[0], self.module.n_input, self.device)
        totals = _EffectTotals(n_outputs, self.module.n_input, self.device, contrasts)
        with _seeded(seed, self.device):
            # inside the seeded block: the encoder's draws must not advance the caller's random state
            control_posterior = self._control_basal_posterior() if basal == "control" else None
            for block_draws in track(plan.blocks, description="Estimating ATEs", disable=not progress_bar):
                half_means = self._ate_block(plan, block_draws, design, library, control_posterior)
                totals.add(half_means[:, :, 1:] - half_means[:, :, :1], plan.half_weights)
        return {
            **totals.summary(),
            "n_samples": plan.n_draws * plan.per_draw,
            "n_draws": plan.n_draws,
            "library_size": float(library),
        }

    def _ate_block(
        self,
        plan: _ATEPlan,
        block_draws: int,
        design: torch.Tensor,
        library: float,
        control_posterior: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    ) -> torch.Tensor:
        """Mean expression on the ATE's scale of each half of ``block_draws`` draws: (draws, 2, conditions, G).

        Each draw of the globals is shared by its ``plan.per_draw`` samples; a sample's basal state comes from the
        prior (one per condition) or from a random control cell's posterior (one shared by every condition).
        """
        n_conditions, n_genes = design.shape[0], self.module.n_input
        globals_ = self.module.sample_globals(block_draws, with_kl=False)
        n_block = block_draws * plan.per_draw
        if control_posterior is None:
            z_basal = torch.randn(block_draws, plan.per_draw, n_conditions, self.module.n_latent, device=self.device)
            covariates = self._sample_covariates((n_block, n_conditions))
        else:
            z_basal, covariates = self._control_basal_draws(control_posterior, n_block)
            z_basal = z_basal.reshape(block_draws, plan.per_draw, -1)
            if covariates is not None:
                covariates = covariates[:, None, :].expand(-1, n_conditions, -1)
        # per draw, its samples in a row
        z = self.module.perturbed_latent(z_basal, design, globals_["shift"]).reshape(n_block, n_conditions, -1)
        half_sums = torch.zeros(block_draws, 2, n_conditions, n_genes, dtype=torch.float64, device=self.device)
        library_sizes = torch.full((plan.per_chunk, n_conditions), library, device=self.device)
        for start in range(0, n_block, plan.per_chunk):
            stop = min(start + plan.per_chunk, n_block)
            px = self.module.generative(
                z[start:stop],
                library_sizes[: stop - start],
                None if covariates is None else covariates[start:stop],
                design=design,
            )["px"]
            for draw, half, lo, hi in _half_segments(start, stop, plan.per_draw, plan.bounds):
                px.accumulate_ate(half_sums[draw, half], rows=slice(lo - start, hi - start))
        return half_sums.div_(torch.tensor(plan.halves, dtype=torch.float64, device=self.device)[None, :, None, None])

    def _control_basal_draws(
        self, control_posterior: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], n_samples: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""``n_samples`` draws :math:`z_b \sim q(z_b \mid x_i)`, each of a random control cell :math:`i`.

        Returns the basal states (S, K) and the cells' covariates (S, J), or ``None``.
        """
        loc, scale, codes = control_posterior
        cells = torch.randint(loc.shape[0], (n_samples,), device=loc.device)
        basal = torch.randn_like(loc[cells]).mul_(scale[cells]).add_(loc[cells])
        return basal, (None if codes is None else codes[cells])

    def _ate_library_size(self, library_size: float | str) -> float:
        if library_size == "median":
            if self.adata is None:
                raise ValueError("library_size='median' needs the registered AnnData.")
            if self.is_minified:
                return float(np.median(self._stored_library()))
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
    """The AnnData of :meth:`TreatmentEffectMixin.screen_combinations`, ranked by ``rank_by``.

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


@dataclass(frozen=True)
class _ATEPlan:
    """How the ATE's samples are grouped.

    ``n_draws`` draws of the globals, each with ``per_draw`` samples in two halves (``halves``; half ``h`` of a draw holds its samples ``bounds[h]:bounds[h + 1]``), decoded ``per_chunk``
    samples at a time, ``blocks`` giving the draws per block of globals.
    """

    n_draws: int
    per_draw: int
    halves: tuple[int, int]
    bounds: tuple[int, int, int]
    per_chunk: int
    blocks: list[int]

    @property
    def half_weights(self) -> tuple[float, float]:
        return self.halves[0] / self.per_draw, self.halves[1] / self.per_draw


def _plan_ate(
    n_samples: int, n_posterior_draws: int, batch_size: int, n_conditions: int, n_genes: int, device: torch.device
) -> _ATEPlan:
    """Split ``n_samples`` into draws, halves, chunks and blocks whose memory stays bounded (see :class:`_ATEPlan`)."""
    _check_positive("batch_size", batch_size, integer=True)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 4:
        raise ValueError(f"`n_samples` must be an integer of at least 4, not {n_samples!r}.")
    if isinstance(n_posterior_draws, bool) or not isinstance(n_posterior_draws, int | np.integer):
        raise ValueError("`n_posterior_draws` must be a positive integer.")
    if n_posterior_draws < 1:
        raise ValueError("`n_posterior_draws` must be a positive integer.")
    n_draws = int(min(n_posterior_draws, n_samples // 2))
    if n_draws < 2:
        raise ValueError(
            "The ATE's uncertainty needs at least 2 posterior draws of 2 samples each: pass n_posterior_draws >= 2 "
            f"and n_samples >= 4 (got {n_posterior_draws} and {n_samples})."
        )
    per_draw = int(n_samples) // n_draws
    halves = (per_draw // 2, per_draw - per_draw // 2)
    chunk_elements = ATE_CHUNK_ELEMENTS.get(device.type, ATE_CHUNK_ELEMENTS["cuda"])
    per_chunk = max(1, min(int(batch_size), chunk_elements // (n_conditions * n_genes)))
    draws_per_block = max(1, (per_chunk * max(1, ATE_BLOCK_SAMPLES // per_chunk)) // per_draw)
    # the block's per-draw sums are (draws, 2, conditions, genes) float64: cap them for genome-wide screens
    draws_per_block = max(1, min(draws_per_block, ATE_BLOCK_BYTES // (2 * n_conditions * n_genes * 8)))
    blocks = [min(draws_per_block, n_draws - start) for start in range(0, n_draws, draws_per_block)]
    return _ATEPlan(n_draws, per_draw, halves, (0, halves[0], per_draw), per_chunk, blocks)


class _EffectTotals:
    r"""Running sums over posterior draws of the effects of each half of a draw, and the ATE's errors from them.

    With :math:`a_j, b_j` the effects of the two halves of draw :math:`j` (independent Monte-Carlo noise, shared
    globals) and :math:`e_j` their weighted mean: the ATE is :math:`\bar e`, its Monte-Carlo error
    :math:`\sqrt{\mathrm{var}(e) / J}`, and the posterior standard deviation :math:`\sqrt{\mathrm{cov}(a, b)}`.
    ``contrasts`` (Q, P): sums of linear combinations of the conditions' effects instead.
    """

    def __init__(self, n_outputs: int, n_genes: int, device: torch.device, contrasts: np.ndarray | None) -> None:
        # a contrast row reads a few conditions: sparse, so that screening thousands of pairs stays linear in them
        self.contrast = None if contrasts is None else _sparse_contrast(contrasts, device)
        self.n_draws = 0
        self.sums = {
            name: torch.zeros(n_outputs, n_genes, dtype=torch.float64, device=device)
            for name in ("sum", "sum_sq", "sum_a", "sum_b", "sum_ab")
        }

    def add(self, effects: torch.Tensor, weights: tuple[float, float]) -> None:
        """Add draws' half effects (draws, 2, P, G)."""
        effects = _apply_contrast(self.contrast, effects)  # (draws, 2, Q, G)
        draw_effect = effects[:, 0] * weights[0] + effects[:, 1] * weights[1]  # (draws, Q, G)
        self.n_draws += effects.shape[0]
        self.sums["sum"] += draw_effect.sum(0)
        self.sums["sum_sq"] += draw_effect.square_().sum(0)
        self.sums["sum_a"] += effects[:, 0].sum(0)
        self.sums["sum_b"] += effects[:, 1].sum(0)
        self.sums["sum_ab"] += effects[:, 0].mul_(effects[:, 1]).sum(0)

    def summary(self) -> dict[str, np.ndarray]:
        n, totals = self.n_draws, self.sums
        correction = n / (n - 1)
        ate = totals["sum"] / n
        draw_variance = (totals["sum_sq"] / n - ate.square()).clamp(min=0) * correction
        covariance = (totals["sum_ab"] / n - totals["sum_a"] * totals["sum_b"] / n**2) * correction
        return {
            "ate": ate.cpu().numpy(),
            "mc_se": (draw_variance / n).sqrt().cpu().numpy(),
            "posterior_sd": covariance.clamp(min=0).sqrt().cpu().numpy(),
        }
