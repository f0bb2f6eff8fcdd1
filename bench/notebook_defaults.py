"""Do the model notebooks' own defaults learn, and in how many minutes? Each model notebook run top to bottom
with papermill exactly as committed (only ``run_name`` and ``data_dir`` given), on the demo's phantom data,
then its validation macro-F1 and wall time, side by side, against the floor its parameters cell promises.

    python bench/notebook_defaults.py [--only 10_simple_cnn,14_vgg] [--data data/phantom/data] [-p key=value]

The floor is 0.6 (chance is 0.33; one class for every film scores 0.17). ``-p`` passes a value to every
notebook (``-p epochs=1``: a dry run of this script). Exits 1 when a notebook fails or scores under the
floor. Run folders go to a scratch ``LUNGS_OUTPUTS``; the demo's data is generated first if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lungs_utils.hardware import describe_cpu

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("10_simple_cnn", "11_resnet", "12_unet", "13_mobilenet", "14_vgg", "15_modern")
FLOOR = 0.6


def run_notebook(name: str, data_dir: Path, outputs: Path, extra: list[str]) -> dict:
    """One notebook with papermill in a fresh process: seconds, val macro-F1 (None when it failed), error tail."""
    run_name = f"defaults_{name}"
    args = ["-p", "run_name", run_name, "-p", "data_dir", str(data_dir)]
    for item in extra:
        key, _, value = item.partition("=")
        args += ["-p", key, value]  # papermill reads numbers and true/false/None
    env = {**os.environ, "LUNGS_OUTPUTS": str(outputs), "LUNGS_PROGRESS": "off"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / f"{name}.ipynb"),
                          str(outputs / f"{name}.ipynb"), *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    metrics = outputs / run_name / "metrics.json"
    if out.returncode != 0 or not metrics.is_file():
        return {"seconds": seconds, "f1": None, "error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return {"seconds": seconds, "f1": json.loads(metrics.read_text())["val_macro_f1"], "error": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated notebook names (default: every model notebook)")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "phantom" / "data",
                    help="the films (default: the demo's phantom data, generated if missing)")
    ap.add_argument("-p", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="a value given to every notebook (for a dry run of this script)")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        print(f"error: not a model notebook: {', '.join(unknown)}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if not (args.data / "train_answers.csv").is_file():
        subprocess.run([sys.executable, "-m", "lungs_utils", "phantom", str(args.data.parent)], check=True)
    print(f"machine: {describe_cpu()}")
    print(f"data: {args.data}" + (f"; given to every notebook: {' '.join(args.extra)}" if args.extra else ""))
    failed = False
    with tempfile.TemporaryDirectory(prefix="lungs-defaults-") as scratch:
        for name in names:
            r = run_notebook(name, args.data, Path(scratch), args.extra)
            if r["f1"] is None:
                failed = True
                print(f"{name}: FAILED after {r['seconds']:.0f} s: {' '.join(r['error'])}", flush=True)
                continue
            verdict = "learns" if r["f1"] >= FLOOR else f"UNDER the {FLOOR} floor"
            failed |= r["f1"] < FLOOR
            print(f"{name}: {r['seconds'] / 60:.1f} min, validation macro-F1 {r['f1']:.3f}: {verdict}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
