"""The ``lungs`` command line (also ``python -m lungs_utils``).

Each sub-command is a thin wrapper over a library call; user errors (``LungsError``) are printed as
one ``error:`` line with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from .. import CLASS_NAMES, __version__
from ..errors import DataWarning, LungsError


def _phantom(args: argparse.Namespace) -> int:
    from ..xrays import phantom

    weights = tuple(float(w) for w in args.class_weights.split(",")) if args.class_weights else (1, 1, 1)
    summary = phantom.generate(args.out, n_train=args.train, n_test=args.test, size=args.size,
                               seed=args.seed, class_weights=weights, overwrite=args.overwrite,
                               shortcut=args.shortcut)
    print(f"phantom dataset: {summary['data_dir']} ({summary['seconds']:.1f} s)")
    for split in ("train", "test"):
        counts = summary[split]
        print(f"  {split:5s} " + ", ".join(f"{CLASS_NAMES[c]} {counts[c]}" for c in range(len(CLASS_NAMES))))
    return 0


def _download(args: argparse.Namespace) -> int:
    from ..competition.kaggle import download

    folder = download(args.dest, force=args.force)
    print(f"competition data ready: {folder}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(n_train=args.train, n_test=args.test, size=args.size, overrides=args.param,
                    fresh=args.fresh)


def _on_exists(args: argparse.Namespace) -> str:
    if getattr(args, "overwrite", False):
        args.param.append("overwrite=true")
    return "resume" if args.resume else "suffix" if args.suffix else "error"


def _audit(args: argparse.Namespace) -> int:
    from ..analysis import audit
    from ..runs import experiment

    for run in args.runs:
        exp = experiment.reopen(run, progress=sys.stderr.isatty())
        exp.params["audit"] = True
        result = experiment.audit(exp, progress=sys.stderr.isatty())
        print(f"{exp.run_dir.name}:\n{audit.summary_line(result)}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ..analysis.apply import predict_folder, summary_lines

    result = predict_folder(args.run, args.images, answers=args.answers, out=args.out, masks=args.masks,
                            mask_run=args.mask_run, progress=sys.stderr.isatty())
    print("\n".join(summary_lines(result)))
    return 0


def _estimate(args: argparse.Namespace) -> int:
    """``--estimate``: the expected minutes of the recipe on this machine; no run folder is written."""
    from ..runs.runner import check_runnable, estimate_line, resolve

    values = resolve(args.params, args.param)
    check_runnable(values)
    line = estimate_line(values, progress=sys.stderr.isatty(), detail=True)
    print(line or f"{values['notebook']} trains nothing: it takes seconds to a minute")
    return 0


def _run(args: argparse.Namespace) -> int:
    from ..runs.runner import run

    if args.estimate:
        return _estimate(args)
    record = run(args.params, args.param, on_exists=_on_exists(args), progress_bar=sys.stderr.isatty())
    score = f", val macro-F1 {record.val_macro_f1:.4f}" if record.val_macro_f1 is not None else ""
    if record.val_ci is not None:
        score += f" (95% CI {record.val_ci[0]:.4f} to {record.val_ci[1]:.4f})"
    print(f"run {record.name} ok in {record.seconds / 60:.1f} min{score}: {record.run_dir}")
    print(f"executed notebook: {record.notebook}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from ..runs import sweep

    values = sweep.sweep_values(args.params, trials=args.trials, minutes=args.minutes, space=args.space,
                                objective=args.objective, pruner=args.pruner, name=args.name)
    sweep.main(values, args.param)
    return 0


def _train(args: argparse.Namespace) -> int:
    """``lungs train PARAMS.yaml [-p k=v ...]``: train without papermill (torchrun-friendly). Rank 0 claims
    the run folder as ``lungs run`` does; the other ranks of torchrun write nothing."""
    import os

    from ..params import load
    from ..paths import claimed
    from ..runs.runner import train

    if args.estimate:
        return _estimate(args)
    on_exists = _on_exists(args)
    values = load(args.params, args.param)
    if int(os.environ.get("RANK", "0")) != 0:
        train(values)
        return 0
    with claimed(values, on_exists):
        metrics = train(values)
    if metrics.get("task") == "segmentation":
        print(f"out-of-fold Dice {metrics['val_dice']:.4f}  IoU {metrics['val_iou']:.4f}  "
              f"masks: {metrics['masks_dir']}")
    else:
        ci = metrics.get("val_macro_f1_ci")
        interval = f" (95% CI {ci[0]:.4f} to {ci[1]:.4f}, {metrics['n_val']} images)" if ci else ""
        which = "out-of-fold" if metrics.get("cv") else "val"
        print(f"{which} macro-F1 {metrics['val_macro_f1']:.4f}{interval}  accuracy {metrics['val_accuracy']:.4f}")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from ..runs.pipeline import format_summary, pipeline
    from ..runs.runner import expand

    if args.estimate:
        for path in expand(args.paths):
            args.params = path
            print(f"{path.name}: ", end="", flush=True)
            _estimate(args)
        return 0
    records = pipeline(args.paths, args.param, on_exists=_on_exists(args), answers=args.answers)
    print(format_summary(records))
    failed = [r for r in records if not r.ok]
    if failed:
        print(f"error: {len(failed)} of {len(records)} runs failed: {', '.join(r.name for r in failed)}",
              file=sys.stderr)
        return 1
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    from ..analysis import leaderboard

    table = leaderboard.gather()
    path = leaderboard.write(table)
    print(leaderboard.format_table(table))
    print(f"written to {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from ..analysis.report import render

    index = render(args.runs or None)
    print(f"report: {index}")
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from ..analysis.ensemble import ensemble_runs

    result = ensemble_runs(args.runs, args.out, method=args.method)
    for name, f1 in result.members_f1.items():
        print(f"  {name:30s} val macro-F1 {f1:.4f}  weight {result.weights[name]:.2f}")
    note = " (optimistic: weights fitted on the same validation set)" if result.method == "weighted" else ""
    print(f"ensemble ({result.method}) val macro-F1 {result.val_f1:.4f}{note}")
    print(f"written to {args.out} (submission.csv, predictions, metrics.json, ensemble.json)")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from ..competition.kaggle import submit

    print(submit(args.file, args.message, test_dir=args.data))
    return 0


def _kaggle_kernel(args: argparse.Namespace) -> int:
    from ..competition.bundle import kernel_bundle, push_kernel

    out = kernel_bundle(args.params, args.out, overrides=args.param, user=args.user, slug=args.slug,
                        title=args.title, gpu=not args.no_gpu, internet=args.internet, private=not args.public,
                        gpus=args.gpus)
    print(f"Kaggle notebook folder: {out}")
    from ..competition.bundle import bundle_params
    from ..engine.estimate import kaggle
    from ..runs.sweep import is_sweep, recipe_of

    baked = bundle_params(args.params, args.param, args.gpus)
    sweep = is_sweep(baked)
    expected = kaggle(recipe_of(baked) if sweep else baked, gpus=args.gpus)
    print(f"a sweep of {baked['trials']} trials, each " + expected["line"] if sweep else expected["line"])
    print(f"time_limit {baked['time_limit']:g} min: training stops at a clean point in time to write a submission "
          "before Kaggle's session ends (-p time_limit=... to change it)")
    if expected["warning"]:
        print(expected["warning"], file=sys.stderr)
    if args.push:
        print(push_kernel(out))
    return 0


def _score(args: argparse.Namespace) -> int:
    from ..stats.scoring import compare_submissions

    rows = compare_submissions(args.files, args.answers)
    for row in rows:
        line = (f"macro-F1 {row['macro_f1']:.4f} (95% CI {row['low']:.4f} to {row['high']:.4f})  accuracy "
                f"{row['accuracy']:.4f}  ({row['n']} rows)")
        print(line if len(rows) == 1 else f"{line}  {row['file']}")
    for row in rows[1:]:
        print(f"{row['file']} vs {rows[0]['file']}: {row['vs_first'].gap_text()} (paired over the same "
              f"{row['n']} images)")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter (YAML value), e.g. -p epochs=5 -p data_dir=null; repeatable")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="reuse an existing run folder and continue training from checkpoints/last.pt")
    group.add_argument("--suffix", action="store_true",
                       help="if the run folder exists, use <run_name>-2, -3, ... instead")
    group.add_argument("--overwrite", action="store_true",
                       help="replace a run already in the run folder (same as -p overwrite=true)")
    group.add_argument("--estimate", action="store_true",
                       help="time a few real steps here and print the expected minutes of the whole recipe "
                            "(folds included); writes no run")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="lungs", description="Chest X-ray classifier suite "
                                     "(0 normal, 1 other disease, 2 COVID-19).")
    parser.add_argument("--version", action="version", version=f"lungs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="phantom data + the demo pipeline, end to end on a CPU")
    p.add_argument("--train", type=int, default=600, help="phantom train images (default 600)")
    p.add_argument("--test", type=int, default=200, help="phantom test images (default 200)")
    p.add_argument("--size", type=int, default=256, help="phantom image size (default 256)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter in every demo run (e.g. -p epochs=1 for a smoke test)")
    p.add_argument("--fresh", action="store_true",
                   help="delete the previous demo runs first (default: resume them; finished ones only re-predict)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("run", help="execute the notebook named by a params file into outputs/<run_name>/")
    p.add_argument("params", type=Path, help="params file, e.g. params/10_simple_cnn.yaml")
    _add_run_options(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("train", help="train from a params file without papermill (torchrun-friendly)")
    p.add_argument("params", type=Path, help="params file, e.g. params/10_simple_cnn.yaml")
    _add_run_options(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("pipeline", help="several runs in order (folders: their *.yaml, sorted)")
    p.add_argument("paths", nargs="+", type=Path, metavar="DIR_OR_FILE", help="params files or folders")
    p.add_argument("--answers", type=Path, metavar="TRUTH.csv",
                   help="score every run's submission against this test answer key (adds test_macro_f1)")
    _add_run_options(p)
    p.set_defaults(func=_pipeline)

    p = sub.add_parser("audit", help="shortcut audit of finished classifier runs from their checkpoints: occlusion "
                                     "hot spots outside the chest (flagged when the simultaneous interval clears "
                                     "0.05), Grad-CAM share inside the lungs, blanking (shown, never flagged); "
                                     "updates their metrics.json and audit.csv")
    p.add_argument("runs", nargs="+", help="run names under outputs/ or run folders")
    p.set_defaults(func=_audit)

    p = sub.add_parser("predict", help="predict any X-ray films with a finished run (classifier, cross-validation "
                                       "or ensemble): predictions.csv; with --answers macro-F1 and the confusion matrix")
    p.add_argument("run", help="a finished run: name under outputs/ or its folder")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGES",
                   help="a folder of films (PNG, JPEG, TIFF, BMP, WebP; any size, RGB or 16-bit) or image files")
    p.add_argument("--answers", type=Path, metavar="CSV",
                   help="the films' classes: id,target_feature (ids from names like img_<id>.png) or file,target_feature")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for predictions.csv (default outputs/predictions/<run>-<folder>)")
    masks = p.add_mutually_exclusive_group()
    masks.add_argument("--masks", type=Path, metavar="DIR", help="the films' lung masks, named like the films "
                       "(runs trained with masks need them; with --answers the shortcut audit runs on them)")
    masks.add_argument("--mask-run", metavar="RUN", help="a lung segmentation run that predicts the films' masks")
    p.set_defaults(func=_predict)

    p = sub.add_parser("sweep", help="tune a recipe with an Optuna study (TPE, median pruning): each trial a run "
                                     "in outputs/<sweep>-t<n>/, the study in outputs/<sweep>/study.db (running the "
                                     "same command again goes on with it), then the trials ranked and best.yaml")
    p.add_argument("params", type=Path, help="the recipe to tune, e.g. params/cpu_small.yaml")
    p.add_argument("--trials", type=int, default=20, help="trials in all (default 20; a resumed sweep counts its own)")
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget of this call: no trial starts that would not fit, the last stops at a clean point")
    p.add_argument("--space", default=None, metavar="SPACE.yaml",
                   help="search space (default params/sweep/cpu_space.yaml)")
    p.add_argument("--objective", choices=("auto", "oof", "val"), default="auto",
                   help="maximise out-of-fold macro-F1 (a cv recipe) or one validation split's (default: oof with cv)")
    p.add_argument("--pruner", choices=("median", "none"), default="median", help="stop trials below the median")
    p.add_argument("--name", default=None, help="the sweep's folder under outputs/ (default <run_name>-sweep)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter of the recipe in every trial, e.g. -p data_dir=DIR")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("leaderboard", help="print every run in outputs/ and write outputs/leaderboard.csv")
    p.set_defaults(func=_leaderboard)

    p = sub.add_parser("report", help="render executed notebooks to HTML with an index page")
    p.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR", help="run folders (default: all in outputs/)")
    p.set_defaults(func=_report)

    p = sub.add_parser("ensemble", help="combine finished runs' predictions into a new run folder")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders to combine")
    p.add_argument("--out", type=Path, required=True, help="folder for the ensemble's files")
    p.add_argument("--method", choices=("mean", "weighted", "vote"), default="mean",
                   help="mean (default: measured best on real X-rays), weighted (Caruana selection; its validation "
                        "score is optimistic) or vote")
    p.set_defaults(func=_ensemble)

    p = sub.add_parser("submit", help="validate a submission, then upload it with the Kaggle API")
    p.add_argument("file", type=Path, help="submission.csv (id,target_feature)")
    p.add_argument("-m", "--message", required=True, help="submission description")
    p.add_argument("--data", type=Path, default=None, help="data folder whose test_images/ the file must cover")
    p.set_defaults(func=_submit)

    p = sub.add_parser("kaggle-kernel", help="turn a notebook + params into a self-contained Kaggle notebook")
    p.add_argument("params", type=Path, help="params file, e.g. params/11_resnet18.yaml")
    p.add_argument("--out", type=Path, required=True, help="folder for the notebook and kernel-metadata.json")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    p.add_argument("--user", default=None, help="Kaggle user name (default: from credentials)")
    p.add_argument("--slug", default=None, help="kernel slug (default: from the title, lungs-<run_name> with '_' as '-')")
    p.add_argument("--title", default=None, help="kernel title (must slugify to the slug)")
    p.add_argument("--no-gpu", action="store_true", help="run on Kaggle's CPU")
    p.add_argument("--gpus", type=int, default=1, choices=(1, 2),
                   help="2: Kaggle's \"GPU T4 x2\", training with torchrun, one process per GPU (default 1)")
    p.add_argument("--internet", action="store_true", help="enable internet on Kaggle")
    p.add_argument("--public", action="store_true", help="make the notebook public")
    p.add_argument("--push", action="store_true", help="upload and run it on Kaggle (needs credentials)")
    p.set_defaults(func=_kaggle_kernel)

    p = sub.add_parser("score", help="score submissions against a truth file (e.g. the phantom's test_answers.csv): "
                                     "macro-F1 with its 95%% interval; several files: each one's gap to the first, "
                                     "paired")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="submission.csv (one or more)")
    p.add_argument("--answers", type=Path, required=True, help="id,target_feature truth file")
    p.set_defaults(func=_score)

    p = sub.add_parser("phantom", help="write a synthetic dataset in the competition layout")
    p.add_argument("out", type=Path, help="output folder (the images go to OUT/data/)")
    p.add_argument("--train", type=int, default=600, help="train images (default 600)")
    p.add_argument("--test", type=int, default=200, help="test images (default 200)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--class-weights", default=None, metavar="W0,W1,W2",
                   help="relative class frequencies, e.g. 1,2,1 (default balanced)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/data")
    p.add_argument("--shortcut", type=float, nargs="?", const=0.9, default=0.0, metavar="SHARE",
                   help="plant a shortcut: a bright corner tag on this share of the COVID-19 images, train "
                        "and test (default without the flag 0; --shortcut alone 0.9)")
    p.set_defaults(func=_phantom)

    p = sub.add_parser("download", help="download the competition data with the Kaggle API")
    p.add_argument("--dest", type=Path, default=None, help="destination (default data/competition)")
    p.add_argument("--force", action="store_true", help="download again even if the data is there")
    p.set_defaults(func=_download)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    # Data warnings are for people: one line, no source location.
    if issubclass(category, DataWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    start = time.perf_counter()
    try:
        return int(args.func(args) or 0)
    except LungsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # e.g. a read-only outputs/ met outside the run-folder checks
        where = exc.filename or "a file"
        print(f"error: cannot write {where} ({exc.strerror}); make it writable, or set LUNGS_OUTPUTS "
              "(or output_dir) to a writable folder", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted after {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return 130
