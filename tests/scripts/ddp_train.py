"""Train a small SAMS-VAE on 1 or more CPU processes and write its per-epoch history (run by tests/test_ddp.py).

Lightning's DDP launcher starts the other ranks by running this script again, so it must be a script, not a test.
Usage: ``python ddp_train.py DEVICES OUTPUT.json``.
"""

import json
import sys

import scvi

import sams_scvi


def main(devices: int, output: str) -> None:
    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    adata = sams_scvi.data.simulate_sams(
        n_perturbations=6, n_genes=30, n_latent=4, n_cells_per_perturbation=120, n_control_cells=300, seed=0
    )
    sams_scvi.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = sams_scvi.SAMSVAE(adata, n_latent=4, n_hidden=32)
    kwargs = {"strategy": "ddp"} if devices > 1 else {}
    model.train(
        max_epochs=6,
        batch_size=64,
        accelerator="cpu",
        devices=devices,
        check_val_every_n_epoch=1,
        enable_progress_bar=False,
        **kwargs,
    )
    if model.trainer is None or model.trainer.is_global_zero:
        history = {key: frame.iloc[:, 0].astype(float).tolist() for key, frame in model.history.items()}
        history["n_train_cells"] = len(model.train_indices)
        with open(output, "w") as handle:
            json.dump(history, handle)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
