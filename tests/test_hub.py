import json

import pytest

import sams_scvi
from sams_scvi.hub import METADATA_FILE, MODEL_CARD_FILE, write_hub_files

from .conftest import TRAIN_KW


@pytest.fixture(scope="module")
def saved_model(tapseq, tmp_path_factory):
    adata = tapseq[:600].copy()
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, **TRAIN_KW)
    folder = tmp_path_factory.mktemp("hub") / "model"
    model.save(folder, save_anndata=True)
    return model, folder


def test_hub_files_describe_the_model_and_refuse_to_clobber(saved_model, tmp_path):
    model, folder = saved_model
    metadata_path, card_path = write_hub_files(folder, description="A test screen.")
    metadata = json.loads(metadata_path.read_text())
    assert metadata["model_cls_name"] == "SAMSVAE" and metadata["model_parent_module"] == "sams_scvi"
    card = card_path.read_text()
    assert card.startswith("---\nlicense: cc-by-4.0\nlibrary_name: scvi-tools\n")
    assert "model_cls_name:SAMSVAE" in card and "A test screen." in card
    assert f"perturbations: {len(model.perturbations)}" in card

    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_hub_files(folder)
    write_hub_files(folder, overwrite=True, license_info="mit")
    assert "license: mit" in card_path.read_text()

    # a README the user wrote is never replaced
    own = tmp_path / "own"
    own.mkdir()
    for name in ("model.pt", "adata.h5ad"):
        (own / name).write_bytes((folder / name).read_bytes())
    (own / MODEL_CARD_FILE).write_text("my notes")
    with pytest.raises(FileExistsError, match="not written by write_hub_files"):
        write_hub_files(own, overwrite=True)
    assert (own / MODEL_CARD_FILE).read_text() == "my notes" and not (own / METADATA_FILE).exists()


def test_scvi_hub_loads_the_model(saved_model):
    pytest.importorskip("huggingface_hub")
    from scvi.hub import HubModel

    model, folder = saved_model
    write_hub_files(folder, overwrite=True)
    hub_model = HubModel(str(folder))
    hub_model.load_model()
    assert type(hub_model.model) is sams_scvi.SAMSVAE
    assert hub_model.model.perturbations == model.perturbations
