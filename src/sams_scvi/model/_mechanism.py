"""Reading the learned mechanisms: masks, shifts, penetrance and responses of a trained model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy.cluster import hierarchy

from sams_scvi._constants import SAMS_REGISTRY_KEYS
from sams_scvi._utils import _as_positions, _check_number, _check_positive, _latent_names, _seeded

# values decoded at once when the effects of latent steps are computed (cells x steps x genes)
STEP_VALUES_PER_CHUNK = 2**22


class MechanismMixin:
    """The per-perturbation mechanism of a trained model: which latent dimensions each perturbation moves."""

    @torch.inference_mode()
    def get_mask_probabilities(self) -> pd.DataFrame:
        """Posterior probability :math:`q(m_{tk} = 1)` that perturbation ``t`` acts on latent dimension ``k``."""
        if not self.module.mechanism.has_mask:
            raise ValueError(f"{self._display_name} has no masks.")
        self._check_if_trained(warn=False)
        probs = torch.sigmoid(self.module.mask_logits).detach().cpu().numpy()
        return pd.DataFrame(
            probs, index=pd.Index(self.perturbations, name="perturbation"), columns=_latent_names(probs.shape[1])
        )

    @torch.inference_mode()
    def get_penetrance(self) -> pd.Series:
        """Estimated probability :math:`\\pi_t` that a cell responds to perturbation ``t`` (``penetrance=True``)."""
        if not self.module.models_penetrance:
            raise ValueError(f"{self._display_name} was built without `penetrance=True`.")
        self._check_if_trained(warn=False)
        values = torch.sigmoid(self.module.penetrance_logit).cpu().numpy()
        return pd.Series(values, index=pd.Index(self.perturbations, name="perturbation"), name="penetrance")

    @torch.inference_mode()
    def get_response_probability(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Posterior probability :math:`q(u_{it} = 1 \\mid x_i)` that cell ``i`` responds to its perturbation ``t``.

        For a model with ``penetrance=True``; globals at their point estimate. Returns cells x perturbations, NaN
        where the cell does not carry the perturbation (a classification of responders and escapers, as
        Mixscape's, from the model's own likelihood).
        """
        if not self.module.models_penetrance:
            raise ValueError(f"{self._display_name} was built without `penetrance=True`.")
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        globals_ = self.module.point_globals()
        blocks = []
        for tensors in self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size):
            probability = self.module.infer_cells(tensors, globals_)["response_probability"][0]
            carried = tensors[SAMS_REGISTRY_KEYS.PERTURBATION_KEY].to(probability.device) != 0
            blocks.append(torch.where(carried, probability, torch.nan).cpu().numpy())
        positions = np.arange(adata.n_obs) if indices is None else _as_positions(adata, indices)
        return pd.DataFrame(
            np.concatenate(blocks),
            index=adata.obs_names[positions],
            columns=pd.Index(self.perturbations, name="perturbation"),
        )

    @torch.inference_mode()
    def get_perturbation_embeddings(self) -> pd.DataFrame:
        """Posterior point estimate of each perturbation's latent shift :math:`m_t \\odot e_t` (perturbations x K)."""
        if not self.module.mechanism.has_shift:
            raise ValueError(f"{self._display_name} has no latent perturbation shifts.")
        self._check_if_trained(warn=False)
        shift = self.module.point_globals()["shift"][0].cpu().numpy()
        return pd.DataFrame(
            shift, index=pd.Index(self.perturbations, name="perturbation"), columns=_latent_names(shift.shape[1])
        )

    # ------------------------------------------------------------------ reading the mechanisms
    def _require_shift(self) -> None:
        if not self.module.mechanism.has_shift:
            raise ValueError(
                f"{self._display_name} has no latent perturbation shifts to read; mechanisms are read from "
                "SAMSVAE, SVAEPlus or CPAVAE."
            )

    @torch.inference_mode()
    def get_effective_shifts(
        self, n_samples: int = 1000, include_penetrance: bool = True, seed: int | None = 0
    ) -> pd.DataFrame:
        r"""Posterior mean latent shift of each perturbation, :math:`E_q[m_t \odot e_t]` (perturbations x K).

        Unlike :meth:`get_perturbation_embeddings` (the shift at the mask mode), a mask entry that is on with
        probability :math:`q` contributes :math:`q` times its embedding. With ``include_penetrance`` (models with
        ``penetrance=True``) each row is multiplied by :math:`\pi_t`: the mean shift of a population of treated
        cells, escapers included.
        """
        self._check_if_trained(warn=False)
        self._require_shift()
        _check_positive("n_samples", n_samples, integer=True)
        n_samples = int(n_samples)
        with _seeded(seed, self.device):
            shift = self.module.sample_globals(n_samples, with_kl=False)["shift"].mean(0)
        if include_penetrance and self.module.models_penetrance:
            shift = shift * torch.sigmoid(self.module.penetrance_logit)[:, None]
        shift = shift.cpu().numpy()
        return pd.DataFrame(
            shift, index=pd.Index(self.perturbations, name="perturbation"), columns=_latent_names(shift.shape[1])
        )

    @torch.inference_mode()
    def get_active_dimensions(self, threshold: float = 0.5) -> pd.DataFrame:
        """The latent dimensions each perturbation acts on: mask entries with :math:`q(m_{tk} = 1) >` ``threshold``.

        Returns a tidy table with one row per active (perturbation, dimension), strongest first within each
        perturbation: ``mask_probability``, ``shift`` (the point shift, :meth:`get_perturbation_embeddings`) and
        ``share`` (the dimension's share of the perturbation's squared shift). Perturbations without any active
        dimension have no row.
        """
        self._check_if_trained(warn=False)
        _check_number("threshold", threshold)
        if not 0 < threshold < 1:
            raise ValueError("`threshold` must lie strictly between 0 and 1.")
        probabilities = self.get_mask_probabilities()
        shifts = self.get_perturbation_embeddings()
        table = probabilities.stack().rename("mask_probability").to_frame()
        table["shift"] = shifts.stack()
        table = table[table["mask_probability"] > threshold].reset_index()
        squared = table["shift"] ** 2
        table["share"] = squared / squared.groupby(table["perturbation"]).transform("sum").replace(0, np.nan)
        order = pd.Categorical(table["perturbation"], categories=self.perturbations, ordered=True)
        table = table.assign(_order=order, _size=-table["shift"].abs()).sort_values(["_order", "_size"])
        return table.drop(columns=["_order", "_size"]).reset_index(drop=True)

    def get_mechanism_similarity(
        self,
        metric: Literal["cosine", "shared_dimensions", "jaccard"] = "cosine",
        threshold: float = 0.5,
        n_samples: int = 1000,
        seed: int | None = 0,
    ) -> pd.DataFrame:
        """Similarity of the perturbations' learned mechanisms (perturbations x perturbations).

        ``"cosine"``: cosine of the effective shifts (:meth:`get_effective_shifts`; NaN for a perturbation with no
        shift); ``"shared_dimensions"``: the number of active dimensions two perturbations share;
        ``"jaccard"``: shared over united active dimensions (NaN when neither has one). Active: mask probability
        above ``threshold``.
        """
        self._check_if_trained(warn=False)
        if metric == "cosine":
            return _cosine_similarity(self.get_effective_shifts(n_samples=n_samples, seed=seed))
        if metric not in ("shared_dimensions", "jaccard"):
            raise ValueError("`metric` must be 'cosine', 'shared_dimensions' or 'jaccard'.")
        _check_number("threshold", threshold)
        if not 0 < threshold < 1:
            raise ValueError("`threshold` must lie strictly between 0 and 1.")
        active = (self.get_mask_probabilities() > threshold).astype(float)
        shared = active @ active.T
        if metric == "shared_dimensions":
            return shared.astype(int)
        sizes = active.sum(1).to_numpy()
        union = sizes[:, None] + sizes[None, :] - shared.to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return pd.DataFrame(shared.to_numpy() / union, index=shared.index, columns=shared.columns)

    def get_mechanisms(
        self,
        threshold: float = 0.5,
        module_distance: float = 0.5,
        n_samples: int = 1000,
        seed: int | None = 0,
    ) -> AnnData:
        """The learned mechanisms as an AnnData with perturbations as observations, grouped into modules.

        ``X`` holds the effective shifts (:meth:`get_effective_shifts`), so :func:`scanpy.pp.neighbors`
        (``use_rep="X"``), :func:`scanpy.tl.leiden` and :func:`scanpy.tl.umap` work on it directly.
        ``obs["module"]`` groups perturbations whose shifts point the same way: average-linkage clustering of the
        cosine distance between effective shifts, cut at ``module_distance`` (0: identical directions, 1:
        orthogonal); perturbations with no shift, or no active dimension (``n_active`` 0), form
        ``"no mechanism"``. Modules are numbered by size.

        Returns
        -------
        AnnData (perturbations x latent dimensions): ``obs`` ``n_cells`` (training cells carrying the
        perturbation), ``n_active`` (dimensions with mask probability above ``threshold``; all K without masks),
        ``shift_norm``, ``penetrance`` (with ``penetrance=True``) and ``module``; ``layers["point_shift"]`` and,
        with masks, ``layers["mask_probability"]``; ``obsp["cosine_similarity"]`` and, with masks,
        ``obsp["shared_dimensions"]``.
        """
        self._check_if_trained(warn=False)
        if not 0 <= module_distance <= 2:
            raise ValueError("`module_distance` is a cosine distance, between 0 and 2.")
        shifts = self.get_effective_shifts(n_samples=n_samples, seed=seed)
        n_latent = shifts.shape[1]
        obs = pd.DataFrame(index=shifts.index.astype(str))
        obs["n_cells"] = self.module.train_perturbation_counts.cpu().numpy().astype(int)
        layers = {"point_shift": self.get_perturbation_embeddings().to_numpy(np.float32)}
        obsp = {"cosine_similarity": _cosine_similarity(shifts).fillna(0.0).to_numpy()}
        if self.module.mechanism.has_mask:
            probabilities = self.get_mask_probabilities()
            layers["mask_probability"] = probabilities.to_numpy(np.float32)
            obs["n_active"] = (probabilities > threshold).sum(1).to_numpy()
            obsp["shared_dimensions"] = self.get_mechanism_similarity("shared_dimensions", threshold).to_numpy()
        else:
            obs["n_active"] = n_latent
        obs["shift_norm"] = np.linalg.norm(shifts.to_numpy(), axis=1)
        if self.module.models_penetrance:
            obs["penetrance"] = self.get_penetrance().to_numpy()
        active = obs["n_active"].to_numpy() > 0 if self.module.mechanism.has_mask else None
        obs["module"] = _cluster_modules(shifts.to_numpy(), module_distance, active)
        return AnnData(
            X=shifts.to_numpy(np.float32),
            obs=obs,
            var=pd.DataFrame(index=shifts.columns.astype(str)),
            layers=layers,
            obsp=obsp,
            uns={"sams_scvi": {"threshold": threshold, "module_distance": module_distance, "n_samples": n_samples}},
        )

    @torch.inference_mode()
    def get_gene_programs(
        self,
        n_top_genes: int | None = 50,
        step: float = 1.0,
        n_cells: int = 1000,
        seed: int | None = 0,
    ) -> pd.DataFrame:
        r"""The genes each latent dimension moves: the decoder's response to a step along that dimension.

        From the basal states of up to ``n_cells`` registered control cells (posterior means; prior draws when the
        model has no control cells), each dimension :math:`k` is moved by ``step`` (in units of the basal prior's
        standard deviation) and decoded. The effect of gene :math:`g` is the population's
        :math:`\log_2` fold change :math:`\log_2 \bar\rho_g(z + s e_k) - \log_2 \bar\rho_g(z)` of the mean
        expression proportion (``likelihood="normal"``: the difference of mean decoded values).

        Returns
        -------
        Tidy table with columns ``latent``, ``gene``, ``effect`` and ``rank`` (1: largest absolute effect), the
        ``n_top_genes`` genes per dimension (``None``: every gene); ``attrs["scale"]`` names the effect's scale.
        Which perturbations act through a dimension: :meth:`get_active_dimensions`.
        """
        self._check_if_trained(warn=False)
        self._require_shift()
        if n_top_genes is not None and n_top_genes < 1:
            raise ValueError("`n_top_genes` must be a positive integer or None.")
        if not np.isfinite(step) or step == 0:
            raise ValueError("`step` must be a nonzero finite number.")
        n_latent = self.module.n_latent
        steps = step * torch.eye(n_latent, device=self.device)
        effect, scale = self._step_effects(steps, n_cells, seed)
        effect = pd.DataFrame(effect, index=_latent_names(n_latent), columns=self._gene_names)
        table = effect.stack().rename("effect").reset_index()
        table.columns = ["latent", "gene", "effect"]
        table["rank"] = table.groupby("latent")["effect"].transform(
            lambda e: e.abs().rank(ascending=False, method="first")
        )
        table["rank"] = table["rank"].astype(int)
        if n_top_genes is not None:
            table = table[table["rank"] <= n_top_genes]
        table = table.sort_values(["latent", "rank"]).reset_index(drop=True)
        table.attrs["scale"] = scale
        return table

    @torch.inference_mode()
    def get_perturbation_programs(
        self, threshold: float = 0.5, n_top_genes: int = 10, n_cells: int = 1000, seed: int | None = 0
    ) -> pd.DataFrame:
        """The programs each perturbation acts through: for each of its active dimensions, the genes that move.

        For every active (perturbation, dimension) of :meth:`get_active_dimensions`, the control cells' basal
        states are moved by the perturbation's own shift along that dimension alone and decoded, as in
        :meth:`get_gene_programs` (whose unit step reads the decoder near the control cells only; a shift of
        several units in either direction can move other genes). Returns a tidy table with one row per
        (perturbation, active dimension, gene), the ``n_top_genes`` largest per dimension: the columns of
        :meth:`get_active_dimensions`, then ``gene``, ``effect`` and ``rank``.
        """
        self._check_if_trained(warn=False)
        if n_top_genes < 1:
            raise ValueError("`n_top_genes` must be a positive integer.")
        _check_number("threshold", threshold)
        if threshold < 0.5:
            raise ValueError(
                "`threshold` must be at least 0.5: below it a dimension's point shift is 0 (mask mode off)."
            )
        active = self.get_active_dimensions(threshold)
        if active.empty:
            return active.assign(gene=pd.Series(dtype=str), effect=pd.Series(dtype=float), rank=pd.Series(dtype=int))
        dimension = active["latent"].map({name: k for k, name in enumerate(_latent_names(self.module.n_latent))})
        steps = torch.zeros(len(active), self.module.n_latent, device=self.device)
        # torch.tensor copies: pandas 3 hands out read-only arrays, which torch.as_tensor warns about
        steps[torch.arange(len(active)), torch.tensor(dimension.to_numpy())] = torch.tensor(
            active["shift"].to_numpy(), dtype=steps.dtype, device=self.device
        )
        effect, scale = self._step_effects(steps, n_cells, seed)
        ranks = np.argsort(np.argsort(-np.abs(effect), axis=1, kind="stable"), axis=1) + 1
        rows, genes = np.nonzero(ranks <= n_top_genes)
        table = active.iloc[rows].reset_index(drop=True)
        table["gene"] = self._gene_names[genes]
        table["effect"] = effect[rows, genes]
        table["rank"] = ranks[rows, genes]
        table = table.assign(_row=rows).sort_values(["_row", "rank"]).drop(columns="_row").reset_index(drop=True)
        table.attrs["scale"] = scale
        return table

    def _step_effects(self, steps: torch.Tensor, n_cells: int, seed: int | None) -> tuple[np.ndarray, str]:
        """Decoded effect (R, G) of moving reference basal states by each row of ``steps`` (R, K), and its scale.

        Log2 fold change of mean expression proportions (``likelihood="normal"``: difference of decoded means),
        from up to ``n_cells`` control cells; decoded a few steps at a time to bound memory.
        """
        if n_cells < 1:
            raise ValueError("`n_cells` must be a positive integer.")
        with _seeded(seed, self.device):
            basal, covariates = self._reference_basal_states(n_cells)

        def mean_expression(z: torch.Tensor) -> torch.Tensor:  # (n, R, K) -> (R, G)
            codes = None if covariates is None else covariates[:, None, :].expand(-1, z.shape[1], -1)
            px = self.module.generative(z, torch.ones(z.shape[:2], device=z.device), codes)["px"]
            return px.log_expression(dim=0)

        reference = mean_expression(basal[:, None, :])
        per_chunk = max(1, STEP_VALUES_PER_CHUNK // max(len(basal) * self.module.n_input, 1))
        effects = [
            mean_expression(basal[:, None, :] + steps[start : start + per_chunk]) - reference
            for start in range(0, len(steps), per_chunk)
        ]
        scale = self.module.px_class.effect_scale
        return torch.cat(effects).cpu().numpy(), scale

    def _reference_basal_states(self, n_cells: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Basal posterior means of up to ``n_cells`` random control cells and their covariates, else prior draws."""
        if self.adata is not None and self._perturbation_state["n_control_cells"] > 0:
            loc, _, codes = self._control_basal_posterior()
            cells = torch.randperm(loc.shape[0], device=loc.device)[:n_cells]
            return loc[cells], (None if codes is None else codes[cells])
        basal = torch.randn(n_cells, self.module.n_latent, device=self.device)
        return basal, self._sample_covariates((n_cells,))


def _cosine_similarity(shifts: pd.DataFrame) -> pd.DataFrame:
    """Cosine similarity of the rows of ``shifts``; NaN for rows that are all zero."""
    values = shifts.to_numpy(float)
    norms = np.linalg.norm(values, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = values / np.where(norms > 0, norms, np.nan)[:, None]
    return pd.DataFrame(unit @ unit.T, index=shifts.index, columns=shifts.index)


def _cluster_modules(shifts: np.ndarray, module_distance: float, active: np.ndarray | None = None) -> pd.Categorical:
    """Average-linkage clusters of the rows' cosine distance, cut at ``module_distance``, numbered by size.

    Rows without a shift, or not ``active`` (no latent dimension credibly on: their small effective shift is the
    prior's, and its direction is noise), form ``"no mechanism"``.
    """
    norms = np.linalg.norm(shifts, axis=1)
    has_shift = norms > 1e-6 * max(norms.max(initial=0.0), 1e-12)
    if active is not None:
        has_shift &= np.asarray(active, dtype=bool)
    labels = np.full(len(shifts), "no mechanism", dtype=object)
    index = np.flatnonzero(has_shift)
    if len(index) == 1:
        clusters = np.array([1])
    elif len(index) > 1:
        tree = hierarchy.linkage(shifts[index], method="average", metric="cosine")
        clusters = hierarchy.fcluster(tree, t=module_distance, criterion="distance")
    if len(index):
        sizes = pd.Series(clusters).value_counts()  # largest first, ties by first appearance
        rename = {cluster: f"module_{i}" for i, cluster in enumerate(sizes.index)}
        labels[index] = [rename[c] for c in clusters]
    categories = sorted(set(labels) - {"no mechanism"}, key=lambda name: int(name.split("_")[1]))
    return pd.Categorical(labels, categories=categories + (["no mechanism"] if (~has_shift).any() else []))
