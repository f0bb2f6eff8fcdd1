"""Results for people: short text summaries for notebooks, and an HTML report of executed notebooks.

``render(run_dirs)`` turns each run's executed notebook into ``outputs/report/<run>.html`` (images
embedded, one self-contained file each) and writes ``outputs/report/index.html``: the leaderboard
with links to every page, so a pipeline's results can be browsed without Jupyter.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import CLASS_NAMES
from ..errors import LungsError
from ..io import atomic_write_text
from ..paths import outputs_dir
from ..runfolder import RunFolder
from ..stats.bootstrap import Interval

REPORT_DIR = "report"


# ------------------------------------------------------------------------------------------------
# Notebook summaries
# ------------------------------------------------------------------------------------------------
def data_summary(data: Any) -> pd.DataFrame:
    """A validated dataset (:class:`lungs_utils.data.LungsData`) as a small table."""
    counts = np.bincount(data.labels["target_feature"].to_numpy(), minlength=len(CLASS_NAMES))
    rows = [("data folder", str(data.data_dir)),
            ("synthetic (phantom)", "yes" if data.synthetic else "no"),
            ("train images", len(data.train)), ("test images", len(data.test)),
            ("lung masks", "yes" if data.masks is not None else "no"),
            ("stored size (H x W)", "{} x {}".format(*data.image_size)),
            ("decoded cache", str(data.cache_dir))]
    rows += [(f"train: {name}", f"{n} ({n / max(counts.sum(), 1):.0%})") for name, n in zip(CLASS_NAMES, counts)]
    return pd.DataFrame(rows, columns=["", "value"]).set_index("")


def experiment_summary(exp: Any) -> pd.DataFrame:
    """What an :class:`~lungs_utils.runs.experiment.Experiment` is about to train, as a small table (a
    cross-validation run: fold 0's figures, the same for every fold)."""
    from .. import models

    p = exp.params
    first = exp.parts[0]
    n_params = sum(t.numel() for t in first.model.parameters())
    rows = [("run folder", str(exp.run_dir)), ("data", str(exp.data.data_dir)),
            ("synthetic data", "yes" if exp.data.synthetic else "no"),
            ("train / val / test images", f"{len(first.train)} / {len(first.val)} / {len(exp.test)}"
             + (f" in each of {exp.cv} folds (out-of-fold: every one of the {len(exp.split.table)} train "
                f"images)" if exp.cv else "")),
            ("model", f"{p['model']} ({n_params / 1e6:.2f} M parameters)"),
            ("input", f"{p['image_size']} px, batch {p['batch_size']}, {p['epochs']} epochs"),
            ("optimiser", f"{p['optimizer']} lr {p['lr']:g}, wd {p['weight_decay']:g}, {p['scheduler']}"),
            ("device", str(p["device"]))]
    if p.get("masks", "none") != "none":
        rows.append(("lung masks", f"{p['masks']}; val/test masks from {p['mask_run']}"))
    try:
        flops = models.describe(first.model, image_size=p["image_size"])["flops"]
        rows.append(("forward cost", f"{flops / 1e9:.2f} GFLOPs per image"))
    except Exception:  # noqa: BLE001 - a cost estimate is nice to have, never a reason to stop
        pass
    return pd.DataFrame(rows, columns=["", "value"]).set_index("")


def outputs_summary(run_dir: str | os.PathLike[str], max_listed: int = 20) -> pd.DataFrame:
    """The files a run folder holds (what to upload, what to look at), with sizes; a folder of more
    than ``max_listed`` files (e.g. predicted masks) is one row."""
    run_dir = Path(run_dir)
    files = [p for p in sorted(run_dir.rglob("*")) if p.is_file() and not p.name.startswith(".")
             and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)]
    per_folder: dict[Path, list[Path]] = {}
    for path in files:
        per_folder.setdefault(path.parent, []).append(path)
    rows, done = [], set()
    for path in files:
        group = per_folder[path.parent]
        if len(group) > max_listed:
            if path.parent not in done:
                done.add(path.parent)
                size = sum(f.stat().st_size for f in group) / 1024
                rows.append((f"{path.parent.relative_to(run_dir)}/ ({len(group)} files)", f"{size:.1f} KB"))
            continue
        rows.append((str(path.relative_to(run_dir)), f"{path.stat().st_size / 1024:.1f} KB"))
    return pd.DataFrame(rows, columns=["file", "size"])


def ensemble_table(result: Any) -> pd.DataFrame:
    """Members of an :class:`~lungs_utils.ensemble.EnsembleResult`: weight and own val macro-F1, plus
    the ensemble's row."""
    rows = [(name, result.weights.get(name, 0.0), f1) for name, f1 in result.members_f1.items()]
    rows.append((f"ensemble ({result.method})", 1.0, result.val_f1))
    frame = pd.DataFrame(rows, columns=["run", "weight", "val_macro_f1"]).set_index("run")
    return frame.round(4)


def score_line(summary: Mapping[str, Any]) -> str:
    """The run's validation macro-F1 with its 95 % bootstrap interval, in one line for the notebook: on the
    validation split, or on a cross-validation run the out-of-fold figure with the folds' spread."""
    ci = summary.get("val_macro_f1_ci")
    interval = f" (95% CI {ci[0]:.4f} to {ci[1]:.4f}, {summary['n_val']} images)" if ci else ""
    cv = summary.get("cv")
    if cv:
        return (f"out-of-fold macro-F1 {summary['val_macro_f1']:.4f}{interval}, accuracy {summary['val_accuracy']:.4f}; "
                f"{cv['k']} folds: {cv['fold_mean']:.4f} ± {cv['fold_std']:.4f} (from {cv['fold_min']:.4f} to "
                f"{cv['fold_max']:.4f}); the test predictions average the {cv['k']} fold models")
    return (f"validation macro-F1 {summary['val_macro_f1']:.4f}{interval}, accuracy {summary['val_accuracy']:.4f} "
            f"(best epoch {summary['best_epoch']} of {summary['epochs_run']})")


def score_table(summary: Mapping[str, Any]) -> pd.DataFrame:
    """Where the validation figure comes from, one row per part: a cross-validation run's folds (held-out
    images, macro-F1 with its 95 % interval, best epoch, epochs, minutes) and then the out-of-fold row
    over every train image; a single-split run's one validation row."""
    ci = summary.get("val_macro_f1_ci") or [np.nan, np.nan]
    cv = summary.get("cv")
    rows = [(f"fold {f['fold']}", f["n_val"], f["val_macro_f1"], *f["val_macro_f1_ci"], f["best_epoch"],
             f["epochs_run"], f["train_seconds"]) for f in (cv["folds"] if cv else [])]
    rows.append(("out-of-fold" if cv else "validation split", summary["n_val"], summary["val_macro_f1"], *ci,
                 summary.get("best_epoch"), summary.get("epochs_run"), summary.get("train_seconds")))
    frame = pd.DataFrame(rows, columns=["", "images", "macro_f1", "ci_low", "ci_high", "best_epoch", "epochs",
                                        "train_minutes"]).set_index("")
    frame["train_minutes"] = pd.to_numeric(frame["train_minutes"], errors="coerce") / 60
    for col in ("best_epoch", "epochs"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").round().astype("Int64")
    return frame.round(4)


def decision_summary(summary: Mapping[str, Any]) -> str:
    """What ``tune_decision`` did in a run (its ``metrics.json``), in one or two sentences; "" when off."""
    tuned = summary.get("decision")
    if not tuned:
        return ""
    cf = tuned["crossfit"]
    offsets = ", ".join(f"{v:+.2f}" for v in tuned["offsets"])
    verdict = ("worth keeping" if cf["gain"] > cf["gain_std"] else
               "within the noise: consider tune_decision: false" if cf["gain"] > 0 else
               "it does not pay here: set tune_decision: false")
    return (f"Decision offsets (log-probability, per class) {offsets} are used for the submission. Cross-fitted "
            f"on the validation set they change macro-F1 by {cf['gain']:+.4f} ± {cf['gain_std']:.4f} "
            f"({cf['plain']:.4f} → {cf['tuned']:.4f}): {verdict}.")


def audit_summary(result: Mapping[str, Any] | None) -> str:
    """The shortcut audit's figures and warnings as text (see :func:`lungs_utils.analysis.audit.summary_line`)."""
    from .audit import summary_line

    return summary_line(result)


def calibration_summary(summary: Mapping[str, Any]) -> str:
    """The calibration figures of ``metrics.json`` in two lines for the notebook."""
    c = summary.get("calibration")
    if not c:
        return "calibration: no validation images"
    crossed = (f"; on held-out halves NLL {c['crossfit_nll_before']:.3f} -> {c['crossfit_nll_after']:.3f}, "
               f"ECE {c['crossfit_ece_before']:.3f} -> {c['crossfit_ece_after']:.3f}"
               if c.get("crossfit_nll_after") is not None else "")
    use = ("the saved predictions (and ensembles built on them) use the calibrated probabilities" if c.get("applied")
           else "not applied (calibrate = False): predictions keep the raw softmax")
    return (f"temperature {c['temperature']:.2f}: NLL {c['nll_before']:.3f} -> {c['nll_after']:.3f}, ECE (15 bins) "
            f"{c['ece_before']:.3f} -> {c['ece_after']:.3f} on the validation set{crossed}.\n{use}; classes are "
            "unchanged.")


def ensemble_verdict(result: Any) -> str:
    """One plain sentence: does the ensemble beat its best member? Judged by the cross-fitted check
    (:func:`lungs_utils.analysis.ensemble.crossfit_gain`), not by the full-set scores (which flatter fitted
    weights and the pick of the best member)."""
    best, best_f1 = max(result.members_f1.items(), key=lambda kv: kv[1])
    plain = (f"Fitted on {result.fitted_on}: ensemble {result.val_f1:.4f}, best member {best} {best_f1:.4f}"
             + (" (fitted weights: optimistic)." if result.method == "weighted" else "."))
    honest = result.honest
    if not honest:
        return f"One member only: nothing to compare. {plain}"
    paired = honest.get("paired")
    if paired:
        plain += f" Paired over those images, ensemble against best member: {Interval(**paired).gap_text()}."
    gain, spread = honest["gain"], honest["gain_std"]
    figure = (f"cross-fitted gain {gain:+.4f} ± {spread:.4f} macro-F1 (weights and best member chosen on "
              f"one half of the validation set, scored on the other, {honest['repeats']} random halvings)")
    if gain <= 0:
        return (f"The ensemble does NOT beat its best member: {figure}. Submit {best}'s own submission, or add "
                f"members that err differently (another architecture, resolution or mask mode). {plain}")
    if gain < spread:
        return (f"The ensemble beats its best member only within the noise: {figure}; the Kaggle score will "
                f"tell. {plain}")
    return f"The ensemble beats its best member: {figure}. {plain}"


def ensemble_metrics(result: Any) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class metrics and confusion matrix of an ensemble's validation predictions."""
    from ..stats.metrics import classification_metrics

    frame = result.val_frame
    # Copies: pandas hands out read-only views, which torch.as_tensor warns about.
    return classification_metrics(np.array(frame["true"]), np.array(frame["predicted"]))


# ------------------------------------------------------------------------------------------------
# HTML report
# ------------------------------------------------------------------------------------------------
def executed_notebook(run_dir: Path) -> Path | None:
    """The executed notebook of a run folder (the one ``run.json`` names, else the only .ipynb)."""
    named = Path(str(RunFolder(run_dir).info.get("executed_notebook") or ""))
    if named.name and (run_dir / named.name).is_file():
        return run_dir / named.name
    found = sorted(run_dir.glob("*.ipynb"))
    return found[0] if found else None


def report_runs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Run folders under ``outputs/`` that hold an executed notebook."""
    root = Path(root) if root is not None else outputs_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != REPORT_DIR and executed_notebook(p))


def notebook_html(notebook: Path) -> str:
    """One executed notebook as a self-contained HTML page (images embedded)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(embed_images=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    return body


def _status(run_dir: Path) -> str:
    return str(RunFolder(run_dir).info.get("status", "?"))


def _index(pages: Mapping[str, Path], folders: Mapping[str, Path], board: pd.DataFrame) -> str:
    from .leaderboard import compact

    def link(name: str) -> str:
        page = pages.get(name)
        return f'<a href="{html.escape(page.name)}">{html.escape(name)}</a>' if page else html.escape(name)

    table = compact(board) if not board.empty else board
    if not table.empty:
        table = table.assign(run=[link(r) for r in table["run"]],
                             audit=['<span class="flag" title="shortcut audit warning: see the run\'s notebook">'
                                    'FLAG</span>' if v == "FLAG" else html.escape(str(v)) for v in table["audit"]])
        board_html = ('<div class="board-wrap">'
                      + table.to_html(index=False, escape=False, na_rep="-", border=0, classes="board") + "</div>")
    else:
        board_html = "<p>No finished model runs yet.</p>"
    items = "\n".join(f"<li>{link(name)} <span class='st'>({html.escape(_status(folders[name]))})</span></li>"
                      for name in pages)
    items_html = (f"<ul>\n{items}\n</ul>" if items else
                  "<p>None here: runs made in JupyterLab keep their notebook where it was opened.</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lungs report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1200px; color: #222;
  box-sizing: border-box; }}
/* A wide leaderboard scrolls inside its own box, the run names staying in view; the page never does. */
.board-wrap {{ max-width: 100%; overflow-x: auto; border: 1px solid #eee; }}
table.board {{ border-collapse: collapse; font-size: 0.85em; white-space: nowrap; }}
table.board th, table.board td {{ padding: 4px 8px; border-bottom: 1px solid #ddd; text-align: right; }}
table.board td:first-child, table.board th:first-child {{ text-align: left; position: sticky; left: 0;
  background: #fff; box-shadow: 1px 0 0 #ddd; }}
.st {{ color: #777; }}
.flag {{ color: #fff; background: #C44E52; padding: 1px 5px; border-radius: 3px; font-weight: 600; }}
</style></head><body>
<h1>lungs — runs</h1>
<p>Chest X-ray classification (0 normal, 1 other disease, 2 COVID-19), scored by validation macro-F1 (out-of-fold
over every train image for cross-validation runs), with its 95 % bootstrap interval (<i>val_f1_low</i> to
<i>val_f1_high</i>). <i>vs_best</i>: against the best run scored on the same images, paired over them —
<i>within noise</i> when the interval of the gap (<i>gap_low</i> to <i>gap_high</i>) holds zero.
Runs marked <i>phantom</i> used the synthetic dataset: their scores say nothing about real X-rays.
<i>lung_share</i>: share of Grad-CAM attention inside the lungs; <i>lungs_blanked_f1</i>: validation macro-F1
with the lungs blanked; <i>audit</i> FLAG: the shortcut audit found the model reading something outside the
lungs; <i>ece</i>: expected calibration error of the saved probabilities.</p>
<h2>Leaderboard</h2>
{board_html}
<h2>Executed notebooks</h2>
{items_html}
</body></html>
"""


def render(run_dirs: Sequence[str | os.PathLike[str]] | None = None, out: str | os.PathLike[str] | None = None
           ) -> Path:
    """Render the runs' executed notebooks (default: every run in ``outputs/``) to HTML, with an index
    page holding the leaderboard; returns the index page's path."""
    from .leaderboard import gather

    folders = [Path(d) for d in run_dirs] if run_dirs is not None else report_runs()
    out = Path(out) if out is not None else outputs_dir() / REPORT_DIR
    pages: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            raise LungsError(f"run folder {folder} does not exist; pass folders under outputs/")
        notebook = executed_notebook(folder)
        if notebook is None:
            continue  # e.g. a run that failed before its notebook started
        page = out / f"{folder.name}.html"
        atomic_write_text(page, notebook_html(notebook))
        pages[folder.name] = page
    by_name = {f.name: f for f in folders}
    # Without a list, the leaderboard shows every run, also those made in JupyterLab (their notebook
    # was saved where it was opened, so they have no page of their own).
    board = gather(folders=[by_name[name] for name in pages]) if run_dirs is not None else gather()
    if not pages and board.empty:
        raise LungsError("no executed notebooks to report: run something first (`lungs run ...` or `lungs demo`)")
    index = out / "index.html"
    atomic_write_text(index, _index(pages, by_name, board))
    return index
