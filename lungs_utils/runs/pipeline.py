"""Several runs in order: ``lungs pipeline`` (and the demo), with a progress bar, scores against an answer
key, and a summary table."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from .. import params as params_mod
from ..errors import LungsError
from .runner import Overrides, RunRecord, execute, expand


def pipeline(paths: Sequence[str | os.PathLike[str]], overrides: Overrides = (), *, on_exists: str = "error",
             echo: bool = True, answers: str | os.PathLike[str] | None = None) -> list[RunRecord]:
    """Run several params files in order (folders expand to their sorted ``*.yaml``).

    A failing run is reported (with its executed notebook) and the rest still run. Overrides apply
    to every run (e.g. ``epochs=1`` for a smoke test). With ``answers`` (a truth file
    ``id,target_feature`` for the test images, e.g. a held-out set's answer key), every run's
    ``submission.csv`` is scored too (``test_macro_f1`` with its 95 % interval), and each run's gap to the
    first scored run, paired over the same test images (``vs_first``: e.g. each mask mode against none).
    """
    from ..progress import bar
    from ..stats.scoring import compare_submissions
    from ..xrays.submission import validate_submission

    files = expand(paths)
    fixed = dict(overrides) if isinstance(overrides, Mapping) else params_mod.parse_overrides(overrides)
    if answers is not None:
        validate_submission(answers)  # a bad truth file fails before hours of training, not after
    records: list[RunRecord] = []
    with bar(total=len(files), desc="pipeline", unit="run", disable=not echo) as progress:
        for path in files:
            progress.set_postfix_str(path.stem)
            try:
                record = execute(path, fixed, on_exists=on_exists,
                                 say=lambda line: progress.write(line) if echo else None)
            except LungsError as exc:
                record = RunRecord(path.stem, path, None, None, "failed", error=str(exc))
            submission = record.run_dir / "submission.csv" if record.run_dir is not None else None
            if answers is not None and record.ok and submission is not None and submission.is_file():
                try:
                    row = compare_submissions([submission], answers)[0]
                    record.test_macro_f1, record.test_ci = row["macro_f1"], (row["low"], row["high"])
                except LungsError as exc:  # e.g. a truth file of another test set: say so, keep going
                    progress.write(f"cannot score {record.name}: {exc}", file=sys.stderr)
            records.append(record)
            if echo and not record.ok:
                progress.write(f"FAILED {path}: {record.error}", file=sys.stderr)
            progress.update()
    scored = [r for r in records if r.test_macro_f1 is not None]
    if answers is not None and len(scored) > 1:
        rows = compare_submissions([r.run_dir / "submission.csv" for r in scored], answers)  # type: ignore[operator]
        for record, row in zip(scored[1:], rows[1:]):
            record.vs_first = row["vs_first"]
    return records


def summary_table(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per run: run, status, val macro-F1 (and test macro-F1 when scored), minutes, executed notebook."""
    columns: dict[str, list[Any]] = {
        "run": [r.name for r in records],
        "status": [r.status for r in records],
        "val_macro_f1": [r.val_macro_f1 for r in records],
    }
    if any(r.test_macro_f1 is not None for r in records):
        columns["test_macro_f1"] = [r.test_macro_f1 for r in records]
        columns["test_95ci"] = [f"{r.test_ci[0]:.3f}-{r.test_ci[1]:.3f}" if r.test_ci else "-" for r in records]
        first = next(r.name for r in records if r.test_macro_f1 is not None)
        columns[f"vs_{first}"] = [r.vs_first.gap_text() if r.vs_first else "-" for r in records]
    columns["minutes"] = [round(r.seconds / 60, 2) for r in records]
    columns["notebook"] = [str(r.notebook) if r.notebook else "-" for r in records]
    return pd.DataFrame(columns)


def format_summary(records: Sequence[RunRecord]) -> str:
    """:func:`summary_table` as aligned text (F1 with 4 decimals, '-' where there is none)."""
    table = summary_table(records)
    for column in ("val_macro_f1", "test_macro_f1"):
        if column in table:
            table[column] = [f"{v:.4f}" if v is not None and not pd.isna(v) else "-" for v in table[column]]
    return table.to_string(index=False)
