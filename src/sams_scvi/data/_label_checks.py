"""Checks of perturbation labels that catch set-up mistakes the parser cannot see on its own.

A label that is almost the control label (``"Control"`` among ``"control"``), two spellings of one perturbation
(``"myc"`` and ``"MYC"``), a perturbation named twice (``"A+A"``), combinations written with another separator
than ``delimiter`` or guide numbers after the delimiter (``"MYC_1"`` with ``delimiter="_"``) all parse without
error into a design that is silently not the one meant.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

# Separators screens use between the perturbations of a combination; a label that splits on one of these into
# perturbations of the screen suggests the wrong `delimiter`.
SEPARATORS = ("+", "_", ",", ";", "|", "&", "/", "::", ":", " ")  # not "-": gene names such as HLA-A
# Names screens give their unperturbed cells, folded (see `_fold`).
CONTROL_NAMES = {
    "control", "ctrl", "ctl", "nontargeting", "nt", "ntc", "nontarget", "safetargeting", "negative", "neg",
    "negctrl", "scramble", "scrambled", "unperturbed", "nonspecific", "none", "wt", "wildtype", "dmso", "vehicle",
}  # fmt: skip


_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")
_DIGITS = re.compile(r"[0-9]+")


def _fold(name: str) -> str:
    """Case, spaces and punctuation removed: the spelling differences that do not make a label a new one."""
    return _NOT_ALPHANUMERIC.sub("", name).casefold()


def control_like(vocabulary: Iterable[str], control_value: str) -> list[str]:
    """Perturbations whose names differ from ``control_value`` only in case, spaces or punctuation."""
    target = _fold(control_value)
    return [name for name in vocabulary if name != control_value and _fold(name) == target]


def control_candidates(labels: Iterable[str]) -> list[str]:
    """Labels that look like the name of unperturbed cells (``"ctrl"``, ``"non-targeting"``, ...)."""
    return sorted({label for label in labels if _fold(label) in CONTROL_NAMES})


def spelling_variants(vocabulary: Iterable[str]) -> list[list[str]]:
    """Groups of perturbations whose names differ only in case, spaces or punctuation (``myc``, ``MYC``)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in vocabulary:
        groups[_fold(name)].append(name)
    return [sorted(group) for group in groups.values() if len(group) > 1]


def repeated_perturbations(labels: Iterable[str], control_value: str, delimiter: str) -> list[str]:
    """Labels that name one perturbation more than once (``"A+A"``), which parse as a dosage of 2."""
    repeated = []
    for label in labels:
        names = [name.strip() for name in label.split(delimiter)]
        names = [name for name in names if name != control_value]
        if len(set(names)) < len(names):
            repeated.append(label)
    return repeated


def numbered_labels(labels: Iterable[str], control_value: str, delimiter: str) -> tuple[list[str], list[str]]:
    """Labels that split into named perturbations and bare numbers (``"MYC_1"`` with ``delimiter="_"``).

    Such a number is almost always a guide's index; as a perturbation of its own it is shared by every label with
    that index and links unrelated perturbations. Labels made only of numbers (numeric perturbation codes) and
    numbers that are also a label on their own (a perturbation in its own right) are not reported. Returns the
    labels and the numbers.
    """
    split = {
        label: [name for name in (n.strip() for n in label.split(delimiter)) if name != control_value]
        for label in labels
    }
    alone = {names[0] for names in split.values() if len(names) == 1}
    found, numbers = [], set()
    for label, names in split.items():
        numeric = {name for name in names if _DIGITS.fullmatch(name) and name not in alone}
        if numeric and any(not _DIGITS.fullmatch(name) for name in names):
            found.append(label)
            numbers |= numeric
    return found, sorted(numbers, key=int)


def guide_number_warning(labels: Iterable[str], control_value: str, delimiter: str, key: str = "key") -> str | None:
    """A warning when labels carry guide numbers after the delimiter (:func:`numbered_labels`), else ``None``.

    Not part of :func:`label_warnings`: a screen may name perturbations by numbers and combine them with named
    ones, which that function's checks must accept; this one is raised where labels are registered, on the
    evidence that numbers sit next to names and are never a label on their own.
    """
    numbered, numbers = numbered_labels(labels, control_value, delimiter)
    if not numbered:
        return None
    guide = re.escape(delimiter) + "[0-9]+(?=" + re.escape(delimiter) + "|$)"
    return (
        f"Labels such as {_examples(numbered)} look like guide numbers after the delimiter {delimiter!r}: they "
        f"split into perturbations named only by a number ({_examples(numbers)}), which every label with that "
        "number shares, so unrelated perturbations are modelled as sharing one. Pass the delimiter that joins "
        "combinations (e.g. delimiter='+') or strip the guide suffix before setup, e.g. "
        f"adata.obs[{key!r}] = adata.obs[{key!r}].str.replace(r'{guide}', '', regex=True)."
    )


def other_delimiter(vocabulary: Iterable[str], control_value: str, delimiter: str) -> tuple[str, list[str]] | None:
    """A separator other than ``delimiter`` that splits perturbation names into other perturbations.

    With ``delimiter="_"`` on labels ``"A"``, ``"B"``, ``"A+B"``, the combination becomes a perturbation
    ``"A+B"`` of its own; this returns ``("+", ["A+B"])``. ``None`` if no separator does so.
    """
    vocabulary = list(vocabulary)
    known = set(vocabulary) | {control_value}
    best: tuple[str, list[str]] | None = None
    for separator in SEPARATORS:
        if separator == delimiter:
            continue
        joined = []
        for name in vocabulary:
            parts = [part.strip() for part in name.split(separator)]
            if len(parts) > 1 and all(part in known for part in parts) and any(p != control_value for p in parts):
                joined.append(name)
        if joined and (best is None or len(joined) > len(best[1])):
            best = (separator, joined)
    return best


def _examples(names: list, n: int = 3) -> str:
    return ", ".join(repr(name) for name in names[:n]) + (", ..." if len(names) > n else "")


def label_warnings(labels: Iterable[str], vocabulary: list[str], control_value: str, delimiter: str) -> list[str]:
    """Warnings about distinct labels that parse into a design other than the likely intended one."""
    labels = list(labels)
    messages = []
    for group in spelling_variants(vocabulary):
        messages.append(
            f"Perturbations {_examples(group)} differ only in case, spaces or punctuation and are modelled as "
            "different perturbations. If they are one perturbation, give them one spelling before setup, e.g. "
            f"adata.obs[key] = adata.obs[key].replace({{{group[1]!r}: {group[0]!r}}})."
        )
    repeated = repeated_perturbations(labels, control_value, delimiter)
    if repeated:
        messages.append(
            f"Labels such as {_examples(repeated)} name a perturbation more than once; each repeat adds a "
            "dose (A+A is dosage 2 of A). If the repeat means one perturbation (e.g. two guides against one gene), "
            "relabel such cells with the single name; for explicit doses use dosage_key."
        )
    found = other_delimiter(vocabulary, control_value, delimiter)
    if found is not None:
        separator, joined = found
        messages.append(
            f"Perturbations such as {_examples(joined)} look like combinations of other perturbations joined by "
            f"{separator!r}, but delimiter={delimiter!r}: each is modelled as a perturbation of its own. "
            f"Pass delimiter={separator!r} to model them as combinations."
        )
    return messages
