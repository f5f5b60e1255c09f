"""Command line: ``sams-scvi demo | train | predict | evaluate | screen``.

A mistake a user can make (a missing file, a wrong column name, a bad number) ends the command with one line,
``sams-scvi <verb>: error: <message>``, on stderr and exit code 1; ``--verbose`` adds the full traceback.
Arguments argparse can check (numbers, choices) are checked before any data is read and exit with code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from sams_scvi._defaults import BASELINES, N_LATENT, SCREEN_RANKS

# Exceptions that, raised while running a verb, mean "the input or the arguments are wrong" rather than "the
# package has a bug"; they are reported in one line. Anything else keeps Python's traceback.
_USER_ERRORS = (ValueError, KeyError, TypeError, IndexError, OSError)

# The baselines `sams_scvi.metrics.baseline_ate` knows; checked at parse time, since `evaluate` computes them
# after the (slow) model metrics.
_BASELINES = BASELINES

if TYPE_CHECKING:
    import pandas as pd

# Only the standard library and sams_scvi._defaults are imported here: `--help` and argument errors answer before
# torch, scvi-tools or pandas load (each verb imports what it needs).

_MODEL_HELP = "folder written by 'sams-scvi train' (holds model.pt)"


class CLIError(Exception):
    """An error in the user's input that the command line found itself; its message is shown as is."""


# ---------------------------------------------------------------------------------------------------- checks
def _int_at_least(minimum: int):
    """Argparse type: a whole number of at least ``minimum``, with a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            word = "a positive whole number" if minimum == 1 else f"a whole number of at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {word}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
# the ATE estimators need a few samples for their Monte-Carlo standard errors and reject fewer than 4; saying so
# at parse time beats failing after the model has been loaded
_n_samples = _int_at_least(4)


def _probability(text: str) -> float:
    """Argparse type of ``--credible-level``: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value < 1):
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1 (e.g. 0.9), got {text}")
    return value


def _require_h5ad(path: Path, flag: str = "") -> None:
    """Raise :class:`CLIError` unless ``path`` is an existing file.

    Parameters
    ----------
    path
        The h5ad file given by the user.
    flag
        The option that gave it (``"--adata"``), or empty for a positional argument.
    """
    what = f"{flag} " if flag else ""
    if not path.exists():
        raise CLIError(f"{what}h5ad file '{path}' does not exist")
    if path.is_dir():
        raise CLIError(f"{what}'{path}' is a folder, not an h5ad file")


def _read_h5ad(path: Path, flag: str = ""):
    """``anndata.read_h5ad(path)``, with a :class:`CLIError` naming the file if it is not HDF5 (h5ad) at all."""
    import anndata as ad
    import h5py

    if not h5py.is_hdf5(path):
        what = f"{flag} " if flag else ""
        raise CLIError(f"{what}'{path}' is not a readable h5ad file (not HDF5); write it with adata.write_h5ad")
    return ad.read_h5ad(path)


def _require_model_dir(path: Path) -> None:
    """Raise :class:`CLIError` unless ``path`` is a folder holding a model saved by ``sams-scvi train``.

    Parameters
    ----------
    path
        The model folder given by the user.
    """
    if not path.exists():
        raise CLIError(f"model folder '{path}' does not exist (expected a folder written by 'sams-scvi train')")
    if not path.is_dir():
        raise CLIError(f"'{path}' is a file, not a model folder written by 'sams-scvi train'")
    if not (path / "model.pt").is_file():
        raise CLIError(f"'{path}' is not a model folder written by 'sams-scvi train' (no model.pt)")


def _output_path(text: str) -> Path:
    """Argparse type of output paths: an empty one would write into the working directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a path")
    return Path(text)


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _model_files(folder: Path) -> list[Path]:
    """The files of a model folder that a verb reads and must never overwrite."""
    return [folder / name for name in ("model.pt", "adata.h5ad", "mdata.h5mu")]


def _require_output_file(path: Path, flag: str, inputs: list[Path] = ()) -> None:
    """Raise :class:`CLIError` if the output file ``path`` cannot be written, or would overwrite an input.

    Checked before any work, so that a typo in an output path does not cost a training run or a long sampling.

    Parameters
    ----------
    path
        The output file given by the user.
    flag
        The option that gave it, e.g. ``"--ate"``.
    inputs
        Files the command reads (the model's files, ``--adata``): writing over one of them is refused.
    """
    if path.is_dir():
        raise CLIError(f"{flag} '{path}' is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise CLIError(f"{flag} '{path}': the folder '{parent}' does not exist")
    for source in inputs:
        if _same_file(path, source):
            raise CLIError(f"{flag} '{path}' is an input of this command ('{source}'); give another file name")


def _require_control_cells(obs: pd.DataFrame, key: str, control_value: str) -> None:
    """Raise :class:`CLIError` if no cell carries the control label.

    The library trains without controls (with a warning), but every later verb needs them: the ATE is measured
    against the control state. A wrong ``--control-value`` should fail before training, not after.

    Parameters
    ----------
    obs
        The cells' annotations.
    key
        The column of perturbation labels; a missing column is left to ``setup_anndata`` to report.
    control_value
        The label of unperturbed cells.
    """
    if key not in obs:
        return
    counts = obs[key].astype(str).str.strip().value_counts()
    if control_value in counts.index:
        return
    shown = ", ".join(repr(label) for label in counts.index[:5]) + (", ..." if len(counts) > 5 else "")
    raise CLIError(
        f"no cell of obs['{key}'] is labelled '{control_value}' (--control-value), and 'predict', 'evaluate' "
        f"and 'screen' need control cells; the most frequent labels are {shown}"
    )


def _load_model(path: Path):
    """Load the SAMS-VAE saved in ``path``; any failure becomes a :class:`CLIError` naming the folder.

    Parameters
    ----------
    path
        A folder written by ``sams-scvi train``.

    Returns
    -------
    The :class:`~sams_scvi.SAMSVAE`.
    """
    _require_model_dir(path)
    from .model import SAMSVAE

    try:
        return SAMSVAE.load(str(path))
    # torch, pickle, anndata and scvi-tools raise many kinds of errors on a damaged or foreign folder
    except Exception as error:
        raise CLIError(f"could not load the model in '{path}': {_message(error)}") from error


def _message(error: BaseException) -> str:
    """One line describing ``error``, for the user."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        # str(KeyError) is the repr of its argument: quotes around a sentence, or a bare key without context
        key = error.args[0]
        text = key if " " in key.strip() else f"not found: {key!r}"
    else:
        text = str(error)
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{text}: '{error.filename}'"
    text = " ".join(text.split())  # library messages may span lines; the error stays on one
    return text or type(error).__name__


# ---------------------------------------------------------------------------------------------------- verbs
def _demo(args: argparse.Namespace) -> None:
    from ._demo import run_demo

    summary = run_demo(args.output, max_epochs=args.max_epochs, seed=args.seed, progress_bar=not args.quiet)
    print("\nSAMS-VAE demo")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")


def _train(args: argparse.Namespace) -> None:
    # check the paths before the slow imports and the training run
    _require_h5ad(args.adata)
    if args.output.exists() and not args.output.is_dir():
        raise CLIError(f"--output '{args.output}' is a file; give a folder for the model")
    if any(_same_file(path, args.adata) for path in _model_files(args.output)):
        raise CLIError(
            f"--output '{args.output}' would overwrite the input '{args.adata}' with the saved model's copy of the "
            "data; give another folder for the model"
        )

    from .model import SAMSVAE

    adata = _read_h5ad(args.adata)
    _require_control_cells(adata.obs, args.perturbation_key, args.control_value)
    SAMSVAE.setup_anndata(
        adata,
        perturbation_key=args.perturbation_key,
        control_value=args.control_value,
        delimiter=args.delimiter,
        layer=args.layer,
        batch_key=args.batch_key,
    )
    from ._utils import _scvi_seed

    # seeded after the checks above, whose errors then come without its log line; main() may be called from Python,
    # so the caller's seed and random states return afterwards
    with _scvi_seed(args.seed):
        model = SAMSVAE(adata, n_latent=args.n_latent)
        model.train(max_epochs=args.max_epochs, enable_progress_bar=not args.quiet)
    model.save(args.output, overwrite=True, save_anndata=True)
    print(f"Saved the trained model (with its AnnData) to {args.output}")


def _predict(args: argparse.Namespace) -> None:
    for path, flag in ((args.ate, "--ate"), (args.output, "--output")):
        if path is not None:
            _require_output_file(path, flag, _model_files(args.model))
    if args.ate is not None and args.output is not None and _same_file(args.ate, args.output):
        raise CLIError(f"--ate and --output name the same file '{args.ate}'; give two file names")
    model = _load_model(args.model)
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
    if args.adata is not None:
        _require_h5ad(args.adata, "--adata")
    _require_output_file(args.output, "--output", [*_model_files(args.model), *([args.adata] if args.adata else [])])
    model = _load_model(args.model)

    from .metrics import evaluate

    adata = model.adata if args.adata is None else _read_h5ad(args.adata, "--adata")
    split = [model.train_indices, model.validation_indices, model.test_indices]
    if args.adata is not None:  # by cell name: --adata may hold the training cells in another order
        split = [model.adata.obs_names.to_numpy()[cells] for cells in split]
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
    setup = model.registry_["setup_args"]  # the baselines read the data as the model does
    labels = {key: setup[key] for key in ("perturbation_key", "control_value", "delimiter", "layer")}
    for baseline in args.baselines:
        tables[baseline] = evaluate(
            baseline,
            adata,
            split,
            subsets=subsets,
            per_perturbation=args.per_perturbation,
            progress_bar=False,
            **labels,
        )
    import pandas as pd

    table = pd.concat(tables, names=["predictor"])
    table.to_csv(args.output)
    print(table.round(3).to_string())
    print(f"Wrote {args.output}")


def _screen(args: argparse.Namespace) -> None:
    _require_output_file(args.output, "--output", _model_files(args.model))
    model = _load_model(args.model)
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


# ---------------------------------------------------------------------------------------------------- parser
class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and examples as written; defaults appended to the help of options that have a real one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # "(default: None)" and "(default: False)" on flags say nothing; helps that explain their default keep it
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _examples(*lines: str) -> str:
    return "Examples:\n" + "\n".join(f"  {line}" for line in lines)


def _version() -> str:
    try:
        return version("sams-scvi")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``sams-scvi`` argument parser.

    Returns
    -------
    The parser; every verb's subparser sets ``func``, the function that runs it.
    """
    parser = argparse.ArgumentParser(
        prog="sams-scvi",
        description="SAMS-VAE for single-cell perturbation screens: train on an h5ad of raw counts, then\n"
        "predict average treatment effects (ATEs), evaluate the model and screen untested combinations.",
        epilog=_examples(
            "sams-scvi demo",
            "sams-scvi train screen.h5ad --perturbation-key guide --output model/",
            "sams-scvi predict model/ --perturbations A B A+B --ate ate.csv",
            "sams-scvi evaluate model/ --output metrics.csv",
            "sams-scvi screen model/ --output pairs.csv --top 20",
        )
        + "\n\nRun 'sams-scvi <verb> --help' for the options of a verb.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--verbose", action="store_true", help="on an error, print the full traceback")

    # Options every verb takes. --verbose is also accepted before the verb; its default here is SUPPRESS because a
    # subparser's defaults overwrite the values the main parser has already set (`sams-scvi --verbose train ...`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose", action="store_true", default=argparse.SUPPRESS, help="on an error, print the full traceback"
    )
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    sub = parser.add_subparsers(dest="command", required=True, title="verbs", metavar="<verb>")

    def add_verb(name: str, summary: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=description,
            epilog=_examples(*examples),
            parents=[common],
            formatter_class=_HelpFormatter,
        )

    demo = add_verb(
        "demo",
        "train on the bundled TAP-seq screen and write results",
        "Train SAMS-VAE on the bundled Schraivogel et al. (2020) TAP-seq screen and write the model,\n"
        "its ATEs (ate.csv, ate_se.csv) and a figure of predicted against observed ATEs\n"
        "(ate_scatter.png) to the output folder.",
        ["sams-scvi demo --output demo_output/", "sams-scvi demo --max-epochs 20 --quiet   # a quick look"],
    )
    demo.add_argument(
        "--output", default="demo_output", type=_output_path, help="folder for the results, created if missing"
    )
    demo.add_argument(
        "--max-epochs", default=None, type=_positive_int, help="training epochs (default: the screen's default length)"
    )
    demo.add_argument("--seed", default=0, type=_int_at_least(0), help="random seed")
    demo.set_defaults(func=_demo)

    train = add_verb(
        "train",
        "train on an h5ad of raw counts",
        "Train SAMS-VAE on an h5ad of raw counts whose .obs has one perturbation label per cell:\n"
        "the control label, a perturbation ('A') or a combination ('A+B'). The model is saved with\n"
        "its AnnData, for 'predict', 'evaluate' and 'screen'.",
        [
            "sams-scvi train screen.h5ad --perturbation-key guide --output model/",
            "sams-scvi train screen.h5ad --perturbation-key guide --control-value NTC --layer counts \\\n"
            "      --batch-key donor --max-epochs 200 --output model/",
        ],
    )
    train.add_argument("adata", type=Path, help="h5ad with raw counts and a perturbation label column in .obs")
    train.add_argument("--perturbation-key", default="perturbation", help="column of .obs with the labels")
    train.add_argument("--control-value", default="control", help="label of unperturbed cells")
    train.add_argument("--delimiter", default="+", help="separator of the perturbations in a combination label")
    train.add_argument("--layer", default=None, help="layer with the raw counts (default: .X)")
    train.add_argument("--batch-key", default=None, help="column of .obs with batches (default: one batch)")
    train.add_argument("--n-latent", default=N_LATENT, type=_positive_int, help="dimension of the latent space")
    train.add_argument(
        "--max-epochs",
        default=None,
        type=_positive_int,
        help="training epochs (default: enough for 4,000 updates of a typical perturbation, at most 8 million cell "
        "passes)",
    )
    train.add_argument("--seed", default=0, type=_int_at_least(0), help="random seed")
    train.add_argument(
        "--output", required=True, type=_output_path, help="folder for the saved model, created if missing"
    )
    train.set_defaults(func=_train)

    predict = add_verb(
        "predict",
        "predict with a model saved by 'train'",
        "Predict with a saved model: average treatment effects against control (ATEs, on the\n"
        "log2(1 + counts per 10k) scale) with --ate, and counterfactual expression of the control\n"
        "cells under each perturbation with --output; give at least one of the two. A combination\n"
        "never observed ('A+B') can be predicted when A and B were each seen in training.",
        [
            "sams-scvi predict model/ --ate ate.csv",
            "sams-scvi predict model/ --perturbations A B A+B --ate ate.csv --output pred.h5ad",
        ],
    )
    predict.add_argument("model", type=Path, help=_MODEL_HELP)
    predict.add_argument(
        "--perturbations", nargs="*", default=None, help="labels, e.g. A A+B (default: those in the training data)"
    )
    predict.add_argument(
        "--output", type=_output_path, default=None, help="h5ad of counterfactual expression of control cells"
    )
    predict.add_argument("--ate", type=_output_path, default=None, help="CSV of average treatment effects")
    predict.add_argument("--n-samples", default=2500, type=_n_samples, help="Monte-Carlo samples of the ATEs (>= 4)")
    predict.set_defaults(func=_predict)

    evaluate = add_verb(
        "evaluate",
        "metrics of a saved model (and baselines) on its own split",
        "Score a saved model, and simple baselines, on the train / validation / test split it was\n"
        "trained with: IWELBO and the agreement of predicted with observed ATEs (Pearson, R2,\n"
        "top-k genes).",
        [
            "sams-scvi evaluate model/ --output metrics.csv",
            "sams-scvi evaluate model/ --per-perturbation --baselines additive --output per_perturbation.csv",
        ],
    )
    evaluate.add_argument("model", type=Path, help=_MODEL_HELP)
    evaluate.add_argument(
        "--adata", type=Path, default=None, help="h5ad to evaluate on, same cells and genes (default: the saved one)"
    )
    evaluate.add_argument(
        "--baselines",
        nargs="*",
        choices=_BASELINES,
        default=list(_BASELINES),
        metavar="NAME",
        help=f"baselines to score too, of {', '.join(_BASELINES)} (default: all; none with no names)",
    )
    evaluate.add_argument("--n-samples", default=2500, type=_n_samples, help="Monte-Carlo samples of the ATEs (>= 4)")
    evaluate.add_argument("--per-perturbation", action="store_true", help="one row per (subset, perturbation)")
    evaluate.add_argument("--output", type=_output_path, default=Path("metrics.csv"), help="CSV of the metrics")
    evaluate.set_defaults(func=_evaluate)

    screen = add_verb(
        "screen",
        "rank untested pairs of perturbations by their predicted non-additivity",
        "Predict pairs of perturbations (default: every pair of perturbations seen in training but\n"
        "never together) and rank them by how far their predicted effect departs from the sum of\n"
        "the singles' effects.",
        [
            "sams-scvi screen model/ --output pairs.csv --top 20",
            "sams-scvi screen model/ --pairs A+B C+D --rank-by effect_norm --output pairs.csv",
        ],
    )
    screen.add_argument("model", type=Path, help=_MODEL_HELP)
    screen.add_argument("--pairs", nargs="*", default=None, help="pairs to screen, e.g. A+B C+D (default: untested)")
    screen.add_argument(
        "--rank-by",
        default="non_additivity_norm",
        choices=SCREEN_RANKS,
        metavar="COLUMN",
        help=f"column to rank by, largest first: {', '.join(SCREEN_RANKS)}",
    )
    screen.add_argument("--n-samples", default=1000, type=_n_samples, help="Monte-Carlo samples (>= 4)")
    screen.add_argument(
        "--credible-level", default=0.9, type=_probability, help="level of the credible intervals, in (0, 1)"
    )
    screen.add_argument("--top", default=None, type=_positive_int, help="keep only this many best-ranked pairs")
    screen.add_argument("--output", type=_output_path, default=Path("screen.csv"), help="CSV of the ranked pairs")
    screen.set_defaults(func=_screen)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sams-scvi`` console script.

    Parameters
    ----------
    argv
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    The exit code: 0 on success, 1 when the input is wrong (a one-line message on stderr), 2 for a usage error.
    Argparse's own usage errors and ``--help`` raise :class:`SystemExit` (code 2 and 0).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"sams-scvi {args.command}"
    if args.command == "predict" and args.output is None and args.ate is None:
        print(f"{prog}: error: give --output and/or --ate", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except (CLIError, *_USER_ERRORS) as error:
        if getattr(args, "verbose", False):
            traceback.print_exc(file=sys.stderr)
        print(f"{prog}: error: {_message(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
