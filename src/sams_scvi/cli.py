"""Command line: ``sams-scvi demo | train | predict | evaluate | screen``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def _demo(args: argparse.Namespace) -> None:
    from ._demo import run_demo

    summary = run_demo(args.output, max_epochs=args.max_epochs, seed=args.seed, progress_bar=not args.quiet)
    print("\nSAMS-VAE demo")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")


def _train(args: argparse.Namespace) -> None:
    import anndata as ad
    import scvi

    from .model import SAMSVAE

    scvi.settings.seed = args.seed
    adata = ad.read_h5ad(args.adata)
    SAMSVAE.setup_anndata(
        adata,
        perturbation_key=args.perturbation_key,
        control_value=args.control_value,
        delimiter=args.delimiter,
        layer=args.layer,
        batch_key=args.batch_key,
    )
    model = SAMSVAE(adata, n_latent=args.n_latent)
    model.train(max_epochs=args.max_epochs, enable_progress_bar=not args.quiet)
    model.save(args.output, overwrite=True, save_anndata=True)
    print(f"Saved the trained model (with its AnnData) to {args.output}")


def _predict(args: argparse.Namespace) -> None:
    from .model import SAMSVAE

    model = SAMSVAE.load(args.model)
    perturbations = args.perturbations or None
    if args.ate is not None:
        ate = model.estimate_ate(perturbations, n_samples=args.n_samples, progress_bar=not args.quiet)
        ate.to_df().to_csv(args.ate)
        print(f"Wrote ATEs of {ate.n_obs} perturbations to {args.ate}")
    if args.output is not None:
        pred = model.predict_perturbation(perturbations, progress_bar=not args.quiet)
        pred.write_h5ad(args.output)
        print(f"Wrote {pred.n_obs} predicted profiles to {args.output}")


def _evaluate(args: argparse.Namespace) -> None:
    import anndata as ad

    from .metrics import evaluate
    from .model import SAMSVAE

    model = SAMSVAE.load(args.model)
    adata = model.adata if args.adata is None else ad.read_h5ad(args.adata)
    split = [model.train_indices, model.validation_indices, model.test_indices]
    subsets = [name for name, cells in zip(("train", "validation", "test"), split, strict=True) if len(cells)] + ["all"]
    tables = {
        "SAMS-VAE": evaluate(
            model,
            adata,
            split,
            subsets=subsets,
            n_ate_samples=args.n_samples,
            per_perturbation=args.per_perturbation,
            progress_bar=not args.quiet,
        )
    }
    for baseline in args.baselines:
        tables[baseline] = evaluate(
            baseline, adata, split, subsets=subsets, per_perturbation=args.per_perturbation, progress_bar=False
        )
    table = pd.concat(tables, names=["predictor"])
    table.to_csv(args.output)
    print(table.round(3).to_string())
    print(f"Wrote {args.output}")


def _screen(args: argparse.Namespace) -> None:
    from .model import SAMSVAE

    model = SAMSVAE.load(args.model)
    screen = model.screen_combinations(
        args.pairs or None,
        rank_by=args.rank_by,
        n_samples=args.n_samples,
        credible_level=args.credible_level,
        progress_bar=not args.quiet,
    )
    table = screen.obs if args.top is None else screen.obs.iloc[: args.top]
    table.to_csv(args.output)
    print(table.head(10).round(3).to_string())
    print(f"Wrote {len(table)} pairs, ranked by {args.rank_by}, to {args.output}")


def build_parser() -> argparse.ArgumentParser:
    """The ``sams-scvi`` argument parser."""
    parser = argparse.ArgumentParser(prog="sams-scvi", description="SAMS-VAE for single-cell perturbation screens.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train on the bundled TAP-seq screen and write results")
    demo.add_argument("--output", default="demo_output", type=Path)
    demo.add_argument("--max-epochs", default=120, type=int)
    demo.add_argument("--seed", default=0, type=int)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="train on an h5ad of raw counts")
    train.add_argument("adata", type=Path, help="h5ad with raw counts and a perturbation label column")
    train.add_argument("--perturbation-key", default="perturbation")
    train.add_argument("--control-value", default="control")
    train.add_argument("--delimiter", default="+")
    train.add_argument("--layer", default=None)
    train.add_argument("--batch-key", default=None)
    train.add_argument("--n-latent", default=32, type=int)
    train.add_argument("--max-epochs", default=None, type=int)
    train.add_argument("--seed", default=0, type=int)
    train.add_argument("--output", required=True, type=Path, help="folder for the saved model")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=_train)

    predict = sub.add_parser("predict", help="predict with a model saved by 'train'")
    predict.add_argument("model", type=Path, help="folder written by 'sams-scvi train'")
    predict.add_argument("--perturbations", nargs="*", default=None, help="labels, e.g. A A+B (default: observed)")
    predict.add_argument("--output", type=Path, default=None, help="h5ad of counterfactual expression of control cells")
    predict.add_argument("--ate", type=Path, default=None, help="CSV of average treatment effects")
    predict.add_argument("--n-samples", default=2500, type=int)
    predict.add_argument("--quiet", action="store_true")
    predict.set_defaults(func=_predict)
    evaluate = sub.add_parser("evaluate", help="metrics of a saved model (and baselines) on its own split")
    evaluate.add_argument("model", type=Path, help="folder written by 'sams-scvi train'")
    evaluate.add_argument("--adata", type=Path, default=None, help="h5ad to evaluate on (default: the saved one)")
    evaluate.add_argument("--baselines", nargs="*", default=["control", "additive", "mean_perturbed"])
    evaluate.add_argument("--n-samples", default=2500, type=int, help="Monte-Carlo samples of the model's ATE")
    evaluate.add_argument("--per-perturbation", action="store_true", help="one row per (subset, perturbation)")
    evaluate.add_argument("--output", type=Path, default=Path("metrics.csv"))
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(func=_evaluate)

    screen = sub.add_parser(
        "screen",
        help="rank untested pairs of perturbations by their predicted non-additivity",
        description="Predict pairs of perturbations (default: every pair seen in training but never together) and "
        "rank them. Example: sams-scvi screen model/ --output pairs.csv --top 20",
    )
    screen.add_argument("model", type=Path, help="folder written by 'sams-scvi train'")
    screen.add_argument("--pairs", nargs="*", default=None, help="pairs to screen, e.g. A+B C+D (default: untested)")
    screen.add_argument("--rank-by", default="non_additivity_norm", help="column to rank by, largest first")
    screen.add_argument("--n-samples", default=1000, type=int, help="Monte-Carlo samples")
    screen.add_argument("--credible-level", default=0.9, type=float)
    screen.add_argument("--top", default=None, type=int, help="keep only the best-ranked pairs")
    screen.add_argument("--output", type=Path, default=Path("screen.csv"))
    screen.add_argument("--quiet", action="store_true")
    screen.set_defaults(func=_screen)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sams-scvi`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "predict" and args.output is None and args.ate is None:
        print("sams-scvi predict: give --output and/or --ate", file=sys.stderr)
        return 2
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
