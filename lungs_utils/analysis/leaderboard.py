"""Every run in ``outputs/`` as one table, and the run-folder look-ups the ensemble notebook needs.

A run folder is any ``outputs/<name>/`` with a ``metrics.json`` (model runs and ensembles); its
``params.yaml``, ``run.json`` and ``history.csv`` fill in the rest. Training time and throughput come
from ``history.csv`` (every epoch, including those before a resume), not from the last session alone.

Every validation macro-F1 carries its 95 % bootstrap interval (``val_f1_low`` / ``val_f1_high``), and runs
scored on the same images (the same split, or cross-validation runs, whose out-of-fold predictions cover
every train image) are compared with the best of them, **paired** over those images: ``vs_best`` says
``best``, or the gap's verdict (:attr:`lungs_utils.stats.bootstrap.Interval.verdict`: ``within noise`` when
its interval holds 0, else ``behind``), with the gap and its interval.
Runs on other images than any other run cannot be compared that way and leave it empty.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataWarning, LungsError
from ..io import atomic_write_csv
from ..paths import named_run, outputs_dir
from ..runfolder import ENSEMBLE, METRICS_FILE, SEGMENTATION, RunFolder
from ..stats.bootstrap import Interval, f1_interval, paired_f1_difference
from ..xrays.submission import TEST_FILE, VAL_FILE, read_run_table

LEADERBOARD_FILE = "leaderboard.csv"
#: Columns every leaderboard has, in display order.
CORE_COLUMNS = ("run", "model", "val_macro_f1", "val_f1_low", "val_f1_high", "vs_best", "gap_to_best", "gap_low",
                "gap_high", "val_images", "val_set", "val_accuracy", "epochs", "best_epoch", "train_minutes",
                "images_per_s", "wall_minutes", "lung_share", "lungs_blanked_f1", "audit", "ece", "status", "data",
                "started", "time_cut")
#: Params never worth a column: they name the run rather than describe it.
_NOT_COMPARED = {"run_name", "output_dir", "notebook", "data_dir", "cache_dir", "resume", "overwrite", "runs",
                 "model"}
#: The only params that mean something for an ensemble (the rest are unused defaults).
_ENSEMBLE_PARAMS = {"ensemble_method"}


def run_folders(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Classification and ensemble run folders (those holding ``metrics.json``) under ``outputs/``,
    sorted by name. Segmentation runs (``"task": "segmentation"``) have no macro-F1 and are left out."""
    root = Path(root) if root is not None else outputs_dir()
    if not root.is_dir():
        return []
    found = []
    for folder in map(RunFolder, sorted(p for p in root.iterdir() if p.is_dir() and (p / METRICS_FILE).is_file())):
        if not folder.metrics:
            warnings.warn(f"{folder.path / METRICS_FILE} is damaged (not a readable JSON object): run {folder.name} is "
                          "left out of the leaderboard; predict again with -p resume=true", DataWarning, stacklevel=2)
        elif folder.kind != SEGMENTATION:
            found.append(folder.path)
    return found


def _history_stats(run_dir: Path) -> dict[str, float]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return {}
    try:
        history = pd.read_csv(path)
        if not {"epoch", "train_seconds"} <= set(history.columns):
            raise ValueError("no epoch or train_seconds column")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError, UnicodeDecodeError, ValueError) as exc:
        warnings.warn(f"{path} is damaged ({type(exc).__name__}): its epochs and minutes are left out of the "
                      "leaderboard", DataWarning, stacklevel=2)
        return {}
    if history.empty:
        return {}
    out: dict[str, float] = {"epochs": float(len(history))}
    if "train_seconds" in history:
        seconds = history["train_seconds"].sum() + history.get("val_seconds", pd.Series(0.0)).sum()
        out["train_minutes"] = float(seconds) / 60
    if "images_per_s" in history:
        out["images_per_s"] = float(history["images_per_s"].median())
    return out


def _audit_columns(metrics: dict[str, Any]) -> dict[str, Any]:
    """Shortcut audit and calibration in four columns: ``audit`` is ``FLAG`` (a warning was raised), ``ok``,
    ``skipped`` (no lung masks) or empty (not audited: ensembles, audit off)."""
    audit = metrics.get("audit") or {}
    ok = audit.get("status") == "ok"
    calibration = metrics.get("calibration") or {}
    # ECE of the probabilities the run saved: the raw softmax's, or when calibrated the cross-fitted
    # figure (in-sample where the validation set was too small to cross-fit).
    if not calibration:
        ece = np.nan
    elif not calibration.get("applied"):
        ece = calibration.get("ece_before", np.nan)
    elif calibration.get("crossfit_ece_after") is not None:
        ece = calibration["crossfit_ece_after"]
    else:
        ece = calibration.get("ece_after", np.nan)
    return {
        "lung_share": audit["lung_share"]["mean"] if ok and audit["lung_share"]["mean"] is not None else np.nan,
        "lungs_blanked_f1": audit["blanking"]["lungs_blanked"] if ok else np.nan,
        "audit": ("FLAG" if audit.get("flags") else "ok") if ok else audit.get("status", ""),
        "ece": ece,
    }


def _val_labels(run_dir: Path) -> pd.DataFrame | None:
    """``id, true, predicted`` of a run's validation (or out-of-fold) predictions, sorted by id; None when
    the file is missing, and when it is damaged one warning line names it (the row then has no interval
    and no comparison: a broken file must neither hide the leaderboard nor be used)."""
    if not (run_dir / VAL_FILE).is_file():
        return None
    try:
        return read_run_table(run_dir, VAL_FILE)[["id", "true", "predicted"]]
    except LungsError as exc:
        warnings.warn(str(exc), DataWarning, stacklevel=2)
        return None


def _interval(metrics: dict[str, Any], labels: pd.DataFrame | None) -> tuple[float, float]:
    ci = metrics.get("val_macro_f1_ci")
    if isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        return float(ci[0]), float(ci[1])
    if labels is None or labels.empty:  # runs made before intervals, and ensembles: from their predictions
        return np.nan, np.nan
    found = f1_interval(labels["true"], labels["predicted"])
    return found.low, found.high


def _time_cut(metrics: dict[str, Any]) -> str:
    """When the time ran out (``time_limit`` or SIGTERM): why, and what the predictions come from."""
    record = metrics.get("time_limit") or {}
    if not record.get("cut"):
        return ""
    return f"{record['cut']}: {len(record.get('parts_used', []))} of {record.get('parts', '?')} part(s) used"


def _pseudo_note(metrics: dict[str, Any]) -> str:
    """A pseudo-labelled run's held-out score is optimistic (its test labels were learned from every train
    film, the held-out ones too): the leaderboard says so beside it."""
    record = metrics.get("pseudo_labels") or {}
    return f" (+{record['films']} pseudo-labelled: optimistic)" if record.get("films") else ""


def row_for(run_dir: Path) -> dict[str, Any]:
    """One leaderboard row: core columns plus every param (prefixed ``param.``)."""
    folder = RunFolder(run_dir)
    metrics, info, params = folder.metrics, folder.info, folder.params
    is_ensemble = folder.kind == ENSEMBLE
    model = (f"ensemble ({metrics.get('ensemble_method', params.get('ensemble_method', '?'))})"
             if is_ensemble else str(metrics.get("model") or params.get("model") or "?"))
    synthetic = metrics.get("synthetic_data")
    labels = _val_labels(run_dir)
    low, high = _interval(metrics, labels)
    row: dict[str, Any] = {
        "run": run_dir.name,
        "model": model,
        "val_macro_f1": metrics.get("val_macro_f1", np.nan),
        "val_f1_low": low, "val_f1_high": high,
        "vs_best": "", "gap_to_best": np.nan, "gap_low": np.nan, "gap_high": np.nan,
        "val_images": len(labels) if labels is not None else metrics.get("n_val", np.nan),
        "val_set": ("out-of-fold" if metrics.get("cv") or metrics.get("oof")
                    else "validation" if labels is not None else "") + _pseudo_note(metrics),
        "val_accuracy": metrics.get("val_accuracy", np.nan),
        "epochs": metrics.get("epochs_run", np.nan),
        "best_epoch": metrics.get("best_epoch", np.nan),
        "train_minutes": (metrics["train_seconds"] / 60) if metrics.get("train_seconds") else np.nan,
        "images_per_s": metrics.get("train_images_per_s") or np.nan,
        "wall_minutes": (info["wall_seconds"] / 60) if info.get("wall_seconds") else np.nan,
        **_audit_columns(metrics),
        "status": info.get("status", "ok" if metrics else "?"),
        "data": "phantom" if synthetic else ("real" if synthetic is False else ""),
        "started": info.get("started", ""),
        "time_cut": _time_cut(metrics),
    }
    row.update({k: v for k, v in _history_stats(run_dir).items() if not is_ensemble})
    for key, value in params.items():
        if key in _NOT_COMPARED or (key in _ENSEMBLE_PARAMS) != is_ensemble:
            continue
        row[f"param.{key}"] = str(value) if isinstance(value, (list, dict)) else value
    return row


def gather(root: str | os.PathLike[str] | None = None,
           folders: Sequence[str | os.PathLike[str]] | None = None) -> pd.DataFrame:
    """All runs under ``outputs/`` (or ``root``, or just ``folders``), best validation macro-F1 first."""
    chosen = run_folders(root) if folders is None else [Path(f) for f in folders
                                                        if (Path(f) / "metrics.json").is_file()]
    rows = [row_for(d) for d in chosen]
    if not rows:
        return pd.DataFrame(columns=list(CORE_COLUMNS))
    table = pd.DataFrame(rows)
    compare_with_best(table, {d.name: d for d in chosen})
    table = table.sort_values(["val_macro_f1", "run"], ascending=[False, True], na_position="last",
                              kind="stable").reset_index(drop=True)
    param_cols = sorted(c for c in table.columns if c.startswith("param."))
    return table[list(CORE_COLUMNS) + param_cols]


def compare_with_best(table: pd.DataFrame, folders: dict[str, Path]) -> None:
    """Fill ``vs_best``, ``gap_to_best``, ``gap_low``, ``gap_high`` in place: each run against the best run
    scored on the same images (same ids and labels), by a paired bootstrap of the macro-F1 gap."""
    labels = {name: _val_labels(folder) for name, folder in folders.items()}
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, name in enumerate(table["run"]):
        frame = labels.get(name)
        if frame is not None and not frame.empty:
            groups.setdefault(tuple(frame["id"]) + tuple(frame["true"]), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        scores = pd.to_numeric(table.loc[members, "val_macro_f1"], errors="coerce")
        best = members[int(np.nanargmax(scores.to_numpy()))]
        reference = labels[table.at[best, "run"]]
        table.at[best, "vs_best"] = "best"
        for i in members:
            if i == best:
                continue
            gap = paired_f1_difference(reference["true"], labels[table.at[i, "run"]]["predicted"],
                                       reference["predicted"])
            table.loc[i, ["gap_to_best", "gap_low", "gap_high"]] = gap.value, gap.low, gap.high
            table.at[i, "vs_best"] = gap.verdict


def varying_params(table: pd.DataFrame) -> list[str]:
    """The ``param.*`` columns whose values differ between runs (what distinguishes them)."""
    cols = [c for c in table.columns if c.startswith("param.")]
    # Among the runs that have the param at all (ensembles lack the training ones).
    return [c for c in cols if table[c].dropna().astype(str).nunique() > 1]


def compact(table: pd.DataFrame) -> pd.DataFrame:
    """The display table: core columns, plus only the params that differ across runs (unprefixed)."""
    shown = table[list(CORE_COLUMNS) + varying_params(table)].copy()
    # A param named like a core column (epochs: planned vs run) keeps its prefix.
    shown.columns = [c if c.removeprefix("param.") in CORE_COLUMNS else c.removeprefix("param.")
                     for c in shown.columns]
    for col in ("val_macro_f1", "val_accuracy", "val_f1_low", "val_f1_high", "gap_to_best", "gap_low", "gap_high"):
        shown[col] = pd.to_numeric(shown[col], errors="coerce").round(4)
    shown["val_images"] = pd.to_numeric(shown["val_images"], errors="coerce").round().astype("Int64")
    for col in ("lung_share", "lungs_blanked_f1", "ece"):
        shown[col] = pd.to_numeric(shown[col], errors="coerce").round(3)
    for col in ("train_minutes", "wall_minutes", "images_per_s"):
        shown[col] = pd.to_numeric(shown[col], errors="coerce").round(2)
    for col in ("epochs", "best_epoch"):
        shown[col] = pd.to_numeric(shown[col], errors="coerce").round().astype("Int64")
    for col in shown.columns[len(CORE_COLUMNS):]:
        # Ensemble rows leave training params empty, which turns integer columns into floats.
        values = shown[col].dropna()
        if len(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer()
                               for v in values):
            shown[col] = shown[col].astype("Int64")
    return shown


def write(table: pd.DataFrame | None = None, path: str | os.PathLike[str] | None = None) -> Path:
    """Write the compact leaderboard to ``outputs/leaderboard.csv`` (atomically); returns the path."""
    table = gather() if table is None else table
    path = Path(path) if path is not None else outputs_dir() / LEADERBOARD_FILE
    atomic_write_csv(compact(table), path)
    return path


def format_table(table: pd.DataFrame, max_rows: int = 40) -> str:
    """The compact leaderboard as aligned text for a terminal."""
    shown = compact(table)
    if shown.empty:
        return "(no finished runs in outputs/ yet: `lungs run params/<file>.yaml` or `lungs demo`)"
    shown["95% CI"] = [f"{lo:.3f}-{hi:.3f}" if pd.notna(lo) and pd.notna(hi) else "-"
                       for lo, hi in zip(shown["val_f1_low"], shown["val_f1_high"])]
    shown["vs_best"] = [Interval(g, lo, hi, n).gap_text() if pd.notna(g) else (v or "-")
                        for v, g, lo, hi, n in zip(shown["vs_best"], shown["gap_to_best"], shown["gap_low"],
                                                   shown["gap_high"], shown["val_images"])]
    columns = ["run", "model", "val_macro_f1", "95% CI", "val_images", "vs_best", "epochs", "train_minutes",
               "images_per_s", "lung_share", "audit", "status"] + [c for c in shown.columns
                                                                     if c not in CORE_COLUMNS and c != "95% CI"]
    shown = shown[columns].head(max_rows)
    text = shown.astype(object).where(shown.notna(), "-")
    for col, fmt in (("val_macro_f1", "{:.4f}"), ("train_minutes", "{:.2f}"),
                     ("images_per_s", "{:.1f}"), ("lung_share", "{:.2f}")):
        text[col] = [fmt.format(v) if v != "-" else v for v in text[col]]
    return text.to_string(index=False)


# ------------------------------------------------------------------------------------------------
# Runs for the ensemble notebook
# ------------------------------------------------------------------------------------------------
def has_predictions(run_dir: Path) -> bool:
    """A finished model run: validation and test predictions present, and not itself an ensemble."""
    return ((run_dir / VAL_FILE).is_file() and (run_dir / TEST_FILE).is_file()
            and RunFolder(run_dir).kind != ENSEMBLE)


def _val_ids(run_dir: Path) -> tuple[int, ...]:
    try:
        return tuple(pd.read_csv(run_dir / VAL_FILE, usecols=["id"])["id"].astype(int))
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return ()


def ensemble_candidates(exclude: Sequence[str | os.PathLike[str]] = (),
                        root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Default ensemble members: finished model runs that share the newest run's validation set.

    Runs on another dataset or split cannot be combined, so they are left out (not an error).
    """
    root = Path(root) if root is not None else outputs_dir()
    skip = {Path(p).resolve() for p in exclude}
    runs = [p for p in sorted(root.iterdir()) if p.is_dir() and has_predictions(p)
            and p.resolve() not in skip] if root.is_dir() else []
    if not runs:
        return []
    newest = max(runs, key=lambda p: (p / VAL_FILE).stat().st_mtime)
    reference = _val_ids(newest)
    return [p for p in runs if _val_ids(p) == reference]


def resolve_runs(names: Sequence[str | os.PathLike[str]], exclude: Sequence[str | os.PathLike[str]] = (),
                 root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Run folders from names (``outputs/<name>``) or paths; empty → :func:`ensemble_candidates`."""
    root = Path(root) if root is not None else outputs_dir()
    if not names:
        found = ensemble_candidates(exclude, root)
        if not found:
            raise LungsError(f"no finished runs with predictions in {root}: run a model notebook first "
                             "(e.g. `lungs run params/10_simple_cnn.yaml`) or list runs: runs=[...]")
        return found
    out = []
    for name in names:
        folder = named_run(name, root)
        if not folder.is_dir():
            available = ", ".join(p.name for p in sorted(root.iterdir()) if p.is_dir() and has_predictions(p)) \
                if root.is_dir() else ""
            raise LungsError(f"run {str(name)!r} not found (neither a folder nor {root / str(name)}); "
                             f"finished runs: {available or 'none'}")
        out.append(folder)
    return out
