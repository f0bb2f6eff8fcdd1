"""``lungs demo``: the whole story on the phantom dataset, on a CPU, in minutes.

Phantom data into ``data/phantom/`` (if absent) → the ``params/demo/`` pipeline (data notebook, lung
masks, two small classifiers, their ensemble, the leaderboard) → ``outputs/leaderboard.csv`` → an HTML report.

Running it again resumes the demo's run folders instead of refusing or piling up ``-2`` copies:
finished models are not retrained (their notebooks re-run from ``checkpoints/last.pt`` and only
re-predict), so a second ``make demo`` takes about a minute. ``--fresh`` deletes the demo's own run
folders first (only those named by ``params/demo/*.yaml``) and trains from scratch.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from ..errors import LungsError
from ..paths import find_data_dir, is_data_dir, outputs_dir, phantom_dir, synthetic_notice_given


def ensure_phantom(n_train: int = 600, n_test: int = 200, size: int = 256, seed: int = 0) -> Path:
    """The demo's phantom data folder, generated on first use."""
    from ..xrays import phantom

    root = phantom_dir()
    if not is_data_dir(root / "data"):
        summary = phantom.generate(root, n_train=n_train, n_test=n_test, size=size, seed=seed)
        print(f"generated phantom dataset in {summary['data_dir']} ({summary['seconds']:.1f} s)")
    return root / "data"


def demo_params() -> list[Path]:
    """The demo's params files, in run order."""
    from ..paths import suite_path
    from ..runs.runner import expand

    return expand([suite_path("params", "demo")])


def _remove_demo_runs(files: Iterable[Path]) -> None:
    from ..params import read_yaml

    root = outputs_dir().resolve()
    for path in files:
        name = read_yaml(path).get("run_name")
        folder = (root / name).resolve() if name else None
        # Only plain sub-folders of outputs/: never follow a name out of it.
        if folder is not None and folder.parent == root and folder.is_dir():
            shutil.rmtree(folder)


def run_demo(n_train: int = 600, n_test: int = 200, size: int = 256, overrides: Iterable[str] = (),
             fresh: bool = False) -> int:
    """Run the demo end to end; prints the pipeline summary, the leaderboard and the report's path.

    Returns the exit status (1 if a run failed).
    """
    from ..analysis import leaderboard, report
    from ..params import parse_overrides
    from ..runs.pipeline import format_summary, pipeline

    t0 = time.perf_counter()
    fixed = parse_overrides(overrides)  # bad -p syntax fails before anything is generated
    phantom = ensure_phantom(n_train, n_test, size)
    files = demo_params()
    if fresh:
        _remove_demo_runs(files)
    try:
        real = find_data_dir(allow_phantom=False)
    except LungsError:
        real = None
    # Said once, here, in the demo's words, rather than as a warning each run repeats.
    print(f"demo data: {real}" if real else
          f"demo data: the synthetic phantom set in {phantom} (its scores say nothing about real X-rays)")
    if not real:
        synthetic_notice_given()
    records = pipeline(files, fixed, on_exists="resume")
    print(format_summary(records))
    table = leaderboard.gather()
    path = leaderboard.write(table)
    print(f"\nleaderboard ({path}):")
    print(leaderboard.format_table(table))
    folders = [r.run_dir for r in records if r.run_dir is not None and r.notebook is not None]
    try:
        index = report.render(folders)
    except LungsError as exc:
        print(f"no report: {exc}")
    else:
        print(f"\nreport: {index}  (open it in a browser)")
    failed = [r.name for r in records if not r.ok]
    print(f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
