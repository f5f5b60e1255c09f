"""Distributed data-parallel training on CPU (2 processes, gloo), the scvi-tools way."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains for minutes; `make test-quick` leaves it out

SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_train.py"


def _history(devices: int, tmp_path: Path) -> dict:
    output = tmp_path / f"history_{devices}.json"
    # Lightning's DDP launcher starts the second rank by running the script again: it must be its own process
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(devices), str(output)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def histories(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    return _history(1, tmp_path), _history(2, tmp_path)


def test_two_processes_train_on_the_same_loss_scale(histories):
    """Each rank sees half of every epoch's cells; the per-cell ELBO and its KL part (which carries each perturbation's
    global KL once per epoch, charged by the training set's counts, not the rank's) match one process's scale."""
    single, double = histories
    assert single["n_train_cells"] == double["n_train_cells"]
    for key in ("elbo_train", "elbo_validation", "reconstruction_loss_train"):
        one, two = np.asarray(single[key]), np.asarray(double[key])
        assert len(one) == len(two) == 6 and np.isfinite(two).all(), key
        # same initial parameters (DDP broadcasts rank 0's); two ranks take half the optimiser steps per epoch
        np.testing.assert_allclose(two[0], one[0], rtol=0.1, err_msg=key)
        np.testing.assert_allclose(two[-1], one[-1], rtol=0.1, err_msg=key)
    # the KL part is small and noisy per epoch: over the run it agrees, where a per-rank count would double it
    kl_one, kl_two = np.mean(single["kl_local_train"]), np.mean(double["kl_local_train"])
    assert 0.65 < kl_two / kl_one < 1.35
    assert double["elbo_train"][-1] < double["elbo_train"][0]  # it learns
