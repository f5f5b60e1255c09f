"""Release readiness: one version everywhere, and the installed package working as shipped.

The version tests and the smoke tests (bundled data, console script, a one-epoch train) run in ``make test``.
``make release-check`` (``.ci/release_check.sh``) builds the wheel, installs it into a fresh virtual environment
and runs this file there with ``SAMS_RELEASE_CHECK=1``, which also runs the test that the package imported is
that wheel's, not this source tree.
"""

import importlib.metadata
import importlib.resources
import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
import pytest
import scvi

import sams_scvi

ROOT = Path(__file__).resolve().parents[1]
IN_RELEASE_ENV = os.environ.get("SAMS_RELEASE_CHECK") == "1"


def _citation_version() -> str:
    text = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    match = re.search(r"""^version:\s*["']?([^"'\s#]+)["']?\s*(?:#.*)?$""", text, flags=re.MULTILINE)
    assert match is not None, "CITATION.cff has no top-level `version:` line"
    return match.group(1)


def test_version_is_the_installed_distributions():
    assert sams_scvi.__version__ == importlib.metadata.version("sams-scvi")


def test_version_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "version" in project, "pyproject.toml should set [project] version (single source)"
    assert sams_scvi.__version__ == project["version"], (
        f"installed {sams_scvi.__version__}, pyproject.toml {project['version']}: reinstall (`pip install -e .`)"
    )


def test_version_matches_citation():
    assert _citation_version() == sams_scvi.__version__


def test_bundled_data_files_are_installed():
    files = importlib.resources.files("sams_scvi.data") / "files"
    names = {entry.name for entry in files.iterdir()}
    assert {"LICENSES.md", "papalexi2021_thp1_sceptredata.h5ad", "schraivogel2020_tapseq_k562.h5ad"} <= names
    licenses = (files / "LICENSES.md").read_text(encoding="utf-8")
    assert "sceptredata" in licenses and "GSM4012688" in licenses


def test_bundled_loaders():
    tapseq = sams_scvi.data.schraivogel2020_tapseq()
    assert tapseq.shape == (10427, 74)
    labels = set(tapseq.obs["perturbation"].astype(str))
    assert "control" in labels and "unassigned" not in labels
    assert any("+" in label for label in labels)
    assert sams_scvi.data.schraivogel2020_tapseq(drop_unassigned=False).shape == (10985, 74)

    eccite = sams_scvi.data.papalexi2021_eccite()
    assert eccite.shape == (20729, 299)
    assert eccite.obs["perturbation"].nunique() == 26 and "grna_counts" in eccite.obsm


def test_console_script_help():
    script = Path(sys.executable).with_name("sams-scvi")
    assert script.exists(), f"no console script next to {sys.executable}"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "train" in result.stdout


def test_ships_the_typing_marker():
    # PEP 561: without py.typed, type checkers ignore the package's annotations
    assert (importlib.resources.files("sams_scvi") / "py.typed").is_file()


HEAVY_MODULES = ("torch", "scvi", "lightning", "pandas", "anndata", "scanpy")


def test_import_and_command_line_parsing_load_no_heavy_library():
    # `sams-scvi --help` and argument errors must answer before torch and scvi-tools load (seconds); a fresh
    # interpreter, since this one has imported them
    code = (
        "import sys, sams_scvi, sams_scvi.cli as cli\n"
        "parser = cli.build_parser()\n"
        "assert parser.parse_args(['screen', 'm', '--output', 'o.csv']).command == 'screen'\n"
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_public_names_load_on_first_use():
    assert sams_scvi.SAMSVAE.__name__ == "SAMSVAE"
    assert sams_scvi.evaluate is sams_scvi.metrics.evaluate
    assert set(sams_scvi.__all__) <= set(dir(sams_scvi))
    with pytest.raises(AttributeError, match="no attribute 'NotAModel'"):
        sams_scvi.NotAModel  # noqa: B018


def test_one_epoch_train_on_bundled_data():
    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    adata = sams_scvi.data.schraivogel2020_tapseq()
    rng = np.random.default_rng(0)
    adata = adata[np.sort(rng.choice(adata.n_obs, 400, replace=False))].copy()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=32)
    model.train(max_epochs=1, enable_progress_bar=False)
    assert model.is_trained
    elbo = model.history["elbo_train"]["elbo_train"].to_numpy(dtype=float)
    assert len(elbo) == 1 and np.isfinite(elbo).all()
    latent = model.get_latent_representation()
    assert latent.shape == (400, 4) and np.isfinite(latent).all()


@pytest.mark.skipif(
    not IN_RELEASE_ENV, reason="runs in the fresh environment with the built wheel: `make release-check`"
)
def test_imports_the_installed_wheel_not_the_source_tree():
    package_dir = Path(sams_scvi.__file__).resolve().parent
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert sys.prefix != sys.base_prefix, "not running in a virtual environment"
    assert package_dir == site_packages / "sams_scvi", package_dir
    assert not package_dir.is_relative_to(ROOT), package_dir

    direct_url = importlib.metadata.distribution("sams-scvi").read_text("direct_url.json")
    assert direct_url is not None, "no direct_url.json: install the built wheel file"
    origin = json.loads(direct_url)
    assert not origin.get("dir_info", {}).get("editable", False), origin
    assert origin["url"].endswith(".whl"), f"not installed from a wheel: {origin}"

    expected = os.environ.get("SAMS_EXPECTED_VERSION")
    assert expected, "set SAMS_EXPECTED_VERSION to the version in the wheel's file name"
    assert sams_scvi.__version__ == expected
