"""An AnnData field that turns per-cell perturbation labels into a multi-hot design matrix ``D``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import rich
from scipy import sparse
from scvi.data.fields import BaseAnnDataField, CategoricalObsField, MuDataWrapper

from ._label_checks import control_like, guide_number_warning


def label_text(value, name: str = "control_value") -> str:
    """A label as the text it is compared by: labels are read with ``astype(str)``, so ``0`` matches ``"0"``."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`{name}` must be a label (text or a number), not {value!r}.")
    return str(value)


# Dosage texts that mean "no dosage given" (NaN, None and pandas' NA are read as "").
NO_DOSAGE = ("nan", "None", "")
# pandas' inferred kinds of a label column that hold only scalars: nothing to scan cell by cell.
_SCALAR_KINDS = {"string", "integer", "floating", "mixed-integer-float", "boolean", "decimal", "integer-na", "empty"}


def check_text_labels(values, label_source: str = "labels", delimiter: str = "+") -> None:
    """Raise a :class:`TypeError` when labels are tuples, lists or arrays instead of text such as ``"A+B"``.

    Such a label would be read as the text of the Python object (``"('A', 'B')"``), one perturbation, so its
    combination would be lost. Numbers and categories of text are labels as they are.
    """
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        values = values.cat.categories
    values = np.asarray(values, dtype=object)
    if values.ndim == 1:
        if pd.api.types.infer_dtype(values, skipna=True) in _SCALAR_KINDS:
            return
        example = next((value for value in values if not pd.api.types.is_scalar(value)), None)
        if example is None:
            return
        shown = f"tuples, lists or arrays (e.g. {example!r})"
    else:
        shown = f"a {values.ndim}-dimensional array"
    raise TypeError(
        f"{label_source} holds {shown}; labels must be text like 'A{delimiter}B', one per cell. Join each "
        f"cell's perturbations first, e.g. {label_source} = {label_source}.map({delimiter!r}.join)."
    )


def parse_perturbations(
    labels: Sequence[str] | pd.Series,
    *,
    control_value: str = "control",
    delimiter: str = "+",
    dosages: Sequence[str] | pd.Series | None = None,
    vocabulary: Sequence[str] | None = None,
    label_source: str = "labels",
    unique_combinations: bool = False,
) -> tuple[sparse.csr_matrix, list[str]]:
    """Parse perturbation labels such as ``"control"``, ``"A"`` or ``"A+B"`` into a design matrix.

    Row ``i`` of the returned matrix ``D`` (cells x atomic perturbations) holds the dosage of each atomic
    perturbation in cell ``i``: 1 for a plain label, the parsed value for a dosage label such as ``"1+0.5"``,
    and all zeros for a control cell. ``control_value`` inside a combination (``"A+control"``) is ignored.

    Parameters
    ----------
    labels
        One label per cell.
    control_value
        The label of unperturbed cells.
    delimiter
        Separator between the atomic perturbations of a combination.
    dosages
        Optional labels of the same shape as ``labels`` with one number per atomic perturbation
        (``"1+0.5"``). Ignored for control cells. A missing entry (NaN, None, pandas' NA or ``""``) gives each
        perturbation of the cell dosage 1; :meth:`~sams_scvi.SAMSVAE.setup_anndata` refuses perturbed cells
        without a dosage instead.
    vocabulary
        Atomic perturbations that define the columns. If given (transfer to new data), a label that names
        a perturbation outside it raises a :class:`ValueError`; unseen combinations of known perturbations
        pass. If ``None``, the sorted set of atomic perturbations in ``labels`` is used.
    label_source
        How to name the labels in error messages, e.g. ``"obs['perturbation']"``.
    unique_combinations
        Encode every distinct label, combinations included, as its own treatment (one-hot rows; the paper's
        ``encode_combos_as_unique``). Such a design cannot express unseen combinations.

    Returns
    -------
    The float32 CSR design matrix and its column names (the vocabulary).

    Raises
    ------
    TypeError
        If labels are tuples, lists or arrays rather than text such as ``"A+B"``.
    """
    if isinstance(labels, pd.Series | pd.Index | pd.Categorical | np.ndarray):
        values = np.asarray(labels, dtype=object)
    else:  # a list of equal-length tuples would become a 2-D array
        values = pd.Series(list(labels), dtype=object).to_numpy()
    check_text_labels(values, label_source, delimiter)
    labels = pd.Series(values)
    missing = labels.isna()
    if missing.any():
        raise ValueError(
            f"{label_source} has {int(missing.sum())} missing (NaN) labels. Give every cell a label "
            f"(controls as {control_value!r}) or drop the unassigned cells before setup."
        )
    control_value = label_text(control_value)
    # every per-cell step works on integer codes; text is made and parsed once per distinct (label, dosage)
    label_codes, label_values = pd.factorize(labels)
    if dosages is not None:
        dosages = np.asarray(dosages, dtype=object)
        if len(dosages) != len(labels):
            raise ValueError("`dosages` must have one entry per cell.")
        dosage_codes, dosage_values = pd.factorize(pd.Series(dosages), use_na_sentinel=False)
    else:
        dosage_codes, dosage_values = np.zeros(len(labels), dtype=np.int64), np.array([""], dtype=object)
    codes, pairs = pd.factorize(label_codes.astype(np.int64) * len(dosage_values) + dosage_codes)
    dosage_texts = ["" if pd.isna(value) else str(value) for value in dosage_values]  # NaN, None, pd.NA: no dosage
    uniques = [(str(label_values[pair // len(dosage_texts)]), dosage_texts[pair % len(dosage_texts)]) for pair in pairs]
    if unique_combinations:
        if any(dosage not in NO_DOSAGE for _, dosage in uniques):
            raise ValueError("Dosages cannot be combined with unique encoding of combinations.")
        parsed = [_unique_treatment(label, control_value, delimiter) for label, _ in uniques]
    else:
        parsed = [_parse_label(label, dosage, control_value, delimiter) for label, dosage in uniques]
        zero_dose = sorted(
            {label for (label, _), atoms in zip(uniques, parsed, strict=True) if atoms and not any(atoms.values())}
        )
        if zero_dose:
            warnings.warn(
                f"Cells of {label_source} labelled {zero_dose[:5]} have dosage 0 for all their perturbations: they "
                "carry no perturbation and are counted as control cells. Drop them before setup if that is not meant.",
                UserWarning,
                stacklevel=2,
            )

    if vocabulary is None:
        vocabulary = sorted({name for atoms in parsed for name in atoms})
    vocabulary = [str(v) for v in vocabulary]
    column = {name: j for j, name in enumerate(vocabulary)}
    unknown = sorted({name for atoms in parsed for name in atoms if name not in column})
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        hint = (
            "With unique encoding of combinations every label is its own treatment, so unseen combinations "
            "cannot be predicted; set up the data with encode_combinations='additive' to predict them."
            if unique_combinations
            else "The model has no embedding for them; it predicts new combinations of known perturbations only. "
            "Teach it new ones from their cells with model.add_perturbations(adata_new)."
        )
        raise ValueError(f"{label_source} contains perturbations the model was not trained on: {shown}. {hint}")

    # One sparse row per unique label, then gather rows by code.
    rows, cols, vals = [], [], []
    for u, atoms in enumerate(parsed):
        for name, value in atoms.items():
            rows.append(u)
            cols.append(column[name])
            vals.append(value)
    unique_design = sparse.csr_matrix(
        (np.asarray(vals, dtype=np.float32), (np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64))),
        shape=(len(parsed), len(vocabulary)),
    )
    design = unique_design[codes].tocsr()
    design.eliminate_zeros()
    return design.astype(np.float32), vocabulary


def _as_number(text: str) -> float | None:
    """The number a label spells (``"0.0"`` -> 0.0), or ``None``."""
    try:
        return float(text)
    except ValueError:
        return None


def _unique_treatment(label: str, control_value: str, delimiter: str) -> dict[str, float]:
    """One treatment named by the label's sorted perturbations, control atoms dropped: ``"B + A"`` -> ``"A+B"``."""
    atoms = sorted(_parse_label(label, "", control_value, delimiter))
    return {delimiter.join(atoms): 1.0} if atoms else {}


def _parse_label(label: str, dosage: str, control_value: str, delimiter: str) -> dict[str, float]:
    """Map one label (and its dosage label) to ``{atomic perturbation: dosage}``."""
    stripped = label.strip()
    if stripped == control_value:
        return {}
    names = [name.strip() for name in stripped.split(delimiter)]
    if any(name == "" for name in names):
        raise ValueError(
            f"Perturbation label {label!r} has an empty perturbation name; labels look like "
            f"'A' or 'A{delimiter}B', and unperturbed cells are labelled {control_value!r}."
        )
    if dosage in NO_DOSAGE:
        values = [1.0] * len(names)
    else:
        parts = dosage.split(delimiter)
        if len(parts) != len(names):
            raise ValueError(
                f"Dosage label {dosage!r} has {len(parts)} values but perturbation label {label!r} "
                f"has {len(names)} perturbations."
            )
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"Dosage label {dosage!r} is not a {delimiter!r}-separated list of numbers.") from None
        if not all(np.isfinite(v) and v >= 0 for v in values):
            raise ValueError(
                f"Dosage label {dosage!r} of perturbation label {label!r} has a negative or non-finite value; "
                "dosages must be finite and >= 0. Fix or drop these cells before setup."
            )
    atoms: dict[str, float] = {}
    for name, value in zip(names, values, strict=True):
        if name == control_value:
            continue
        atoms[name] = atoms.get(name, 0.0) + value
    return atoms


class PerturbationField(BaseAnnDataField):
    """Registers ``obs[perturbation_key]`` as a cells x atomic-perturbations design matrix.

    The matrix (float32, sparse) is written to ``obsm["_scvi_perturbation"]``; the vocabulary of atomic
    perturbations, the control label and the delimiter are kept in the state registry, so new data is
    encoded with the training vocabulary: unseen combinations of known perturbations transfer, unknown
    perturbations raise a :class:`ValueError`.

    Parameters
    ----------
    registry_key
        Key of the field in the registry and in minibatches.
    perturbation_key
        Column of ``adata.obs`` with one label per cell (``"control"``, ``"A"``, ``"A+B"``).
    control_value
        Label of unperturbed cells.
    delimiter
        Separator of combinations.
    dosage_key
        Optional column of ``adata.obs`` with per-perturbation dosages (``"1+0.5"``). Control cells need none;
        a perturbed cell without one (NaN, None, pandas' NA or ``""``) raises a :class:`ValueError`.
    encode_combinations
        ``"additive"``: a combination's row is the sum of its perturbations' rows. ``"unique"``: every distinct
        label is its own treatment (one-hot design), as SVAE+ requires.
    """

    def __init__(
        self,
        registry_key: str,
        perturbation_key: str,
        control_value: str = "control",
        delimiter: str = "+",
        dosage_key: str | None = None,
        encode_combinations: str = "additive",
    ) -> None:
        super().__init__()
        if not delimiter:
            raise ValueError("`delimiter` must be a non-empty string.")
        if encode_combinations not in ("additive", "unique"):
            raise ValueError(f"`encode_combinations` must be 'additive' or 'unique', not {encode_combinations!r}.")
        self.encode_combinations = encode_combinations
        self._registry_key = registry_key
        self.perturbation_key = perturbation_key
        self.control_value = label_text(control_value)
        self.delimiter = delimiter
        self.dosage_key = dosage_key

    @property
    def registry_key(self) -> str:
        return self._registry_key

    @property
    def attr_name(self) -> str:
        return "obsm"

    @property
    def attr_key(self) -> str:
        return f"_scvi_{self._registry_key}"

    @property
    def is_empty(self) -> bool:
        return False

    def validate_field(self, adata) -> None:
        for key in (self.perturbation_key, self.dosage_key):
            if key is not None and key not in adata.obs:
                columns = [c for c in adata.obs.columns if not str(c).startswith("_scvi_")]  # not scvi-tools' own
                raise KeyError(f"{key!r} is not a column of adata.obs; available columns: {columns}.")
        # before any set or text operation on the labels: lists are unhashable and tuples lose their combination
        check_text_labels(adata.obs[self.perturbation_key], f"adata.obs[{self.perturbation_key!r}]", self.delimiter)

    def _match_numeric_control(self, labels: pd.Series) -> None:
        """Write the control label as the labels do: ``control_value=0`` on labels ``0.0, 1.0, ...`` is ``"0.0"``."""
        texts = {str(label).strip() for label in pd.unique(labels.dropna())}
        if self.control_value in texts:
            return
        try:
            value = float(self.control_value)
        except ValueError:
            return
        equal = [text for text in texts if _as_number(text) == value]
        if len(equal) == 1:
            self.control_value = str(equal[0])

    def _encode(self, adata, vocabulary=None) -> tuple[sparse.csr_matrix, list[str]]:
        labels = adata.obs[self.perturbation_key]
        self._match_numeric_control(labels)
        dosages = adata.obs[self.dosage_key] if self.dosage_key is not None else None
        design, vocabulary = parse_perturbations(
            labels,
            control_value=self.control_value,
            delimiter=self.delimiter,
            dosages=dosages,
            vocabulary=vocabulary,
            label_source=f"adata.obs[{self.perturbation_key!r}]",
            unique_combinations=self.encode_combinations == "unique",
        )
        if dosages is not None and self.encode_combinations == "additive":
            self._check_dosages_given(adata, design)
        adata.obsm[self.attr_key] = design
        return design, vocabulary

    def _check_dosages_given(self, adata, design: sparse.csr_matrix) -> None:
        """Raise when a perturbed cell has no dosage: the parser would read it as dosage 1 without a word."""
        codes, values = pd.factorize(adata.obs[self.dosage_key])  # NaN, None and pandas' NA: code -1
        blank = [code for code, value in enumerate(values) if str(value).strip() in NO_DOSAGE]
        lacking = np.isin(codes, [-1, *blank]) & (design.getnnz(axis=1) > 0)
        if not lacking.any():
            return
        first = int(np.flatnonzero(lacking)[0])
        label = adata.obs[self.perturbation_key].iloc[first]
        raise ValueError(
            f"adata.obs[{self.dosage_key!r}] has no dosage for {int(lacking.sum())} perturbed cells (e.g. cell "
            f"{adata.obs_names[first]!r}, labelled {label!r}); it would be read as dosage 1. Give every perturbed "
            f"cell its dosages ('1', or '1{self.delimiter}0.5' for a combination) or drop those cells before setup; "
            "control cells need none."
        )

    def _check_control_spelling(self, adata) -> None:
        """Raise when labels differ from the control label only in spelling: they would become a perturbation."""
        # missing labels are reported by the parser; pandas 3 keeps them as NaN through astype(str)
        labels = {str(label).strip() for label in pd.unique(adata.obs[self.perturbation_key].dropna())}
        atoms = {name.strip() for label in labels for name in label.split(self.delimiter)}
        variants = sorted(control_like(atoms, self.control_value))
        if variants:
            has_control = self.control_value in atoms
            raise ValueError(
                f"adata.obs[{self.perturbation_key!r}] has labels {variants} that differ from the control label "
                f"{self.control_value!r} only in case, spaces or punctuation; they would be modelled as a "
                "perturbation. "
                + (
                    f"Give the control cells one label, e.g. adata.obs[{self.perturbation_key!r}] = "
                    f"adata.obs[{self.perturbation_key!r}].replace({{{variants[0]!r}: {self.control_value!r}}})."
                    if has_control
                    else f"Pass control_value={variants[0]!r}."
                )
            )

    def _state(self, adata, design: sparse.csr_matrix, vocabulary: list[str]) -> dict:
        codes, values = pd.factorize(adata.obs[self.perturbation_key])
        is_control = np.asarray(design.getnnz(axis=1) == 0)
        perturbed = np.bincount(codes[~is_control], minlength=len(values)) > 0
        observed = sorted({str(label).strip() for label in np.asarray(values, dtype=object)[perturbed]})
        return {
            "vocabulary": vocabulary,
            "control_value": self.control_value,
            "delimiter": self.delimiter,
            "encode_combinations": self.encode_combinations,
            "observed_labels": [str(label) for label in observed],
            "n_control_cells": int(is_control.sum()),
        }

    def register_field(self, adata) -> dict:
        super().register_field(adata)
        self._check_control_spelling(adata)
        design, vocabulary = self._encode(adata)
        if len(vocabulary) == 0:
            raise ValueError(
                f"adata.obs[{self.perturbation_key!r}] holds only the control label {self.control_value!r}; "
                "SAMS-VAE needs perturbed cells."
            )
        state = self._state(adata, design, vocabulary)
        if self.encode_combinations == "additive":  # unique encoding keeps "MYC_1" one treatment: nothing shared
            message = guide_number_warning(
                state["observed_labels"], self.control_value, self.delimiter, self.perturbation_key
            )
            if message is not None:
                # the user's setup_anndata call, above setup_anndata, _register and scvi-tools' registration
                warnings.warn(message, UserWarning, stacklevel=6)
        return state

    def transfer_field(self, state_registry: dict, adata_target, extend_categories: bool = False, **kwargs) -> dict:
        """Encode ``adata_target`` with the source's design columns.

        ``extend_categories`` (scvi-tools' query mapping): perturbations the source does not have become new
        columns after its own, in sorted order; otherwise they raise a ``ValueError``. The state records in
        ``reference_control_cells`` the control cells of the source's data (and of its own references).
        """
        super().transfer_field(state_registry, adata_target, **kwargs)
        self.validate_field(adata_target)
        vocabulary = list(state_registry["vocabulary"])
        if extend_categories:
            _, found = parse_perturbations(
                adata_target.obs[self.perturbation_key],
                control_value=self.control_value,
                delimiter=self.delimiter,
                label_source=f"adata.obs[{self.perturbation_key!r}]",
                unique_combinations=self.encode_combinations == "unique",
            )
            vocabulary += sorted(set(found) - set(vocabulary))
        design, vocabulary = self._encode(adata_target, vocabulary=vocabulary)
        state = self._state(adata_target, design, vocabulary)
        # control cells of the models this registration descends from (a query model's reference learned the
        # unperturbed state from them even when the query has none)
        inherited = state_registry.get("reference_control_cells", 0)
        if extend_categories:
            inherited += state_registry["n_control_cells"]
        if inherited:
            state["reference_control_cells"] = int(inherited)
        return state

    def get_summary_stats(self, state_registry: dict) -> dict:
        return {"n_perturbations": len(state_registry["vocabulary"])}

    def view_state_registry(self, state_registry: dict) -> rich.table.Table | None:
        table = rich.table.Table(title=f"{self.registry_key} state registry")
        table.add_column("Source location", justify="center", style="dodger_blue1", no_wrap=True)
        table.add_column("Perturbations", justify="center", style="green")
        table.add_column("Design column", justify="center", style="dark_violet")
        for j, name in enumerate(state_registry["vocabulary"]):
            table.add_row(f"adata.obs['{self.perturbation_key}']" if j == 0 else "", name, str(j))
        return table


MuDataPerturbationField = MuDataWrapper(PerturbationField)


class PerturbationLabelsField(CategoricalObsField):
    """The perturbation labels as scvi-tools' ``labels``, which its criticism groups cells by.

    No network reads them. Data the model has not seen may carry labels it has not seen (an untested
    combination, a new perturbation), so a transfer adds their categories instead of refusing them.
    """

    def register_field(self, adata) -> dict:
        with warnings.catch_warnings():
            # scvi-tools warns of categories with fewer than 3 cells; rare combinations are the rule in a screen,
            # and the perturbation field has already checked the labels
            warnings.filterwarnings("ignore", message=".*has fewer than 3 cells", category=UserWarning)
            return super().register_field(adata)

    def transfer_field(self, state_registry: dict, adata_target, **kwargs) -> dict:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*has fewer than 3 cells", category=UserWarning)
            return super().transfer_field(state_registry, adata_target, **{**kwargs, "extend_categories": True})


MuDataPerturbationLabelsField = MuDataWrapper(PerturbationLabelsField)
