"""Properties of the perturbation-label parser and its set-up checks, over generated screens (hypothesis)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sams_scvi.data import parse_perturbations
from sams_scvi.data._label_checks import _fold, label_warnings

DELIMITERS = ["+", "_", ";", "|", "::", ","]
# Perturbation names: letters and digits only, so no delimiter or other separator can occur inside one.
NAMES = st.text(alphabet="ABCDEFGHKLMNPQRSTWXYZabcdefghkmnpqrstwxyz0123456789", min_size=1, max_size=8)


@st.composite
def screens(draw):
    """A vocabulary of distinct perturbations (distinct in spelling too) and cells as sets of them (empty: control)."""
    names = draw(st.lists(NAMES, min_size=1, max_size=6, unique_by=_fold))
    names = [name for name in names if _fold(name) != "control"] or ["GENE1"]
    cells = draw(st.lists(st.lists(st.sampled_from(names), max_size=3, unique=True), min_size=1, max_size=25))
    delimiter = draw(st.sampled_from(DELIMITERS))
    return names, cells, delimiter


def _label(atoms, delimiter, pad: str) -> str:
    return f"{pad}{(pad + delimiter + pad).join(atoms)}{pad}" if atoms else f"{pad}control{pad}"


@settings(max_examples=150, deadline=None)
@given(screens(), st.sampled_from(["", " ", "  "]), st.randoms(use_true_random=False))
def test_labels_round_trip_through_the_design(screen, pad, rng):
    """Each cell's row has a 1 exactly at its perturbations, whatever their order and the spaces around them."""
    _, cells, delimiter = screen
    labels = [_label(rng.sample(atoms, len(atoms)), delimiter, pad) for atoms in cells]
    design, vocabulary = parse_perturbations(labels, delimiter=delimiter)
    assert vocabulary == sorted({a for atoms in cells for a in atoms})
    dense = design.toarray()
    for row, atoms in zip(dense, cells, strict=True):
        assert {vocabulary[j] for j in np.flatnonzero(row)} == set(atoms)
        assert set(row[row != 0]) <= {1.0}
    # transfer to new data with the training vocabulary gives the same rows
    again, _ = parse_perturbations(labels, delimiter=delimiter, vocabulary=vocabulary)
    np.testing.assert_array_equal(again.toarray(), dense)


@settings(max_examples=100, deadline=None)
@given(screens(), st.data())
def test_dosages_round_trip(screen, data):
    _, cells, delimiter = screen
    doses = [[data.draw(st.floats(0.01, 100.0, allow_nan=False)) for _ in atoms] for atoms in cells]
    labels = [_label(atoms, delimiter, "") for atoms in cells]
    dosage_labels = [delimiter.join(repr(d) for d in ds) if ds else "" for ds in doses]
    design, vocabulary = parse_perturbations(labels, delimiter=delimiter, dosages=dosage_labels)
    dense = design.toarray()
    for row, atoms, ds in zip(dense, cells, doses, strict=True):
        expected = np.zeros(len(vocabulary), np.float32)
        for atom, dose in zip(atoms, ds, strict=True):
            expected[vocabulary.index(atom)] = dose
        np.testing.assert_allclose(row, expected, rtol=1e-6)


@settings(max_examples=100, deadline=None)
@given(screens(), st.integers(1, 4))
def test_a_repeated_perturbation_adds_doses_and_is_reported(screen, repeats):
    names, _, delimiter = screen
    label = delimiter.join([names[0]] * (repeats + 1))
    design, vocabulary = parse_perturbations(["control", label], delimiter=delimiter)
    assert design.toarray()[1, vocabulary.index(names[0])] == repeats + 1
    assert any("more than once" in m for m in label_warnings([label], vocabulary, "control", delimiter))


@settings(max_examples=150, deadline=None)
@given(screens())
def test_a_clean_screen_raises_no_label_warning(screen):
    """No false alarms: distinct spellings, no repeats and one separator give no warning."""
    _, cells, delimiter = screen
    labels = sorted({_label(atoms, delimiter, "") for atoms in cells} - {"control"})
    _, vocabulary = parse_perturbations(["control", *labels], delimiter=delimiter)
    assert label_warnings(labels, vocabulary, "control", delimiter) == []


@settings(max_examples=100, deadline=None)
@given(screens(), st.sampled_from(DELIMITERS))
def test_combinations_written_with_another_delimiter_are_reported(screen, wrong):
    """A combination of perturbations that also occur alone, parsed with the wrong delimiter, names the right one."""
    names, _, delimiter = screen
    if len(names) < 2 or wrong in delimiter or delimiter in wrong:
        return
    labels = [names[0], names[1], delimiter.join(names[:2])]
    _, vocabulary = parse_perturbations(["control", *labels], delimiter=wrong)
    assert delimiter.join(names[:2]) in vocabulary  # the combination became a perturbation of its own ...
    messages = label_warnings(labels, vocabulary, "control", wrong)
    assert any(f"delimiter={delimiter!r}" in m for m in messages)  # ... and the warning names the fix


@settings(max_examples=100, deadline=None)
@given(NAMES, st.sampled_from([str.upper, str.lower, str.title, lambda s: f"{s}-"]))
def test_spellings_of_one_perturbation_are_reported(name, respell):
    variant = respell(name)
    if variant == name or _fold(name) == "control":
        return
    _, vocabulary = parse_perturbations(["control", name, variant])
    assert any("differ only in case" in m for m in label_warnings([name, variant], vocabulary, "control", "+"))
