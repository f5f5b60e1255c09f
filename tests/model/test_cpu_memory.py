"""The CPU training step's allocator setting: applied for the duration of training, then restored."""

import platform

import pytest
import scvi
import torch

import sams_scvi
from sams_scvi.model import _cpu_memory


class RecordingLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return 1


def test_pad_is_set_for_the_block_and_restored_even_after_an_error(monkeypatch):
    libc = RecordingLibc()
    monkeypatch.setattr(_cpu_memory, "_glibc", lambda: libc)
    with pytest.raises(RuntimeError), _cpu_memory.reuse_freed_memory(pad_bytes=12345) as applied:
        assert applied
        assert libc.calls == [(_cpu_memory._M_TOP_PAD, 12345)]
        raise RuntimeError("training failed")
    assert libc.calls[-1] == (_cpu_memory._M_TOP_PAD, _cpu_memory._GLIBC_DEFAULT_TOP_PAD)


def test_disabled_or_without_glibc_nothing_is_called(monkeypatch):
    libc = RecordingLibc()
    monkeypatch.setattr(_cpu_memory, "_glibc", lambda: libc)
    with _cpu_memory.reuse_freed_memory(enabled=False) as applied:
        assert not applied
    monkeypatch.setattr(_cpu_memory, "_glibc", lambda: None)
    with _cpu_memory.reuse_freed_memory() as applied:
        assert not applied
    assert libc.calls == []


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_real_glibc_accepts_the_setting():
    with _cpu_memory.reuse_freed_memory() as applied:
        assert applied


def test_training_gives_the_same_parameters_with_and_without_the_setting():
    """The setting changes where memory comes from, never a number."""
    results = []
    for flag in (True, False):
        scvi.settings.seed = 0
        adata = sams_scvi.data.simulate_sams(
            n_perturbations=3, n_genes=30, n_latent=4, n_cells_per_perturbation=40, n_control_cells=60
        )
        sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
        model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
        model.train(max_epochs=2, batch_size=64, reuse_cpu_memory=flag, enable_progress_bar=False)
        results.append({k: v.clone() for k, v in model.module.state_dict().items()})
    for key, value in results[0].items():
        torch.testing.assert_close(value, results[1][key], rtol=0, atol=0)
