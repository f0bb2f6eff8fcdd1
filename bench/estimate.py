"""How close is `--estimate` to the real minutes? Each recipe is estimated, then trained for real with
`lungs train` in a fresh process, and both are printed side by side with their ratio.

    python bench/estimate.py                                   # the demo's recipes on phantom data
    python bench/estimate.py --data QU_DEV/data params/cpu_small.yaml params/cpu_cv.yaml

Recipes default to the demo's (`params/demo/*`: lung masks, the two classifiers); pass params files to
time others. `-p key=value` applies to all (e.g. `-p precision=fp32`, with `ONEDNN_MAX_CPU_ISA=AVX2` in
the environment to see a CPU without bf16 instructions).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, phantom_data

from lungs_utils.engine import estimate
from lungs_utils import params as P

DEMO = ("05_lung_segmentation.yaml", "15_resnet_tiny.yaml", "16_resnet_tiny_masks.yaml")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params", nargs="*", type=Path, help="params files (default: the demo's recipes)")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: a 600-film phantom set)")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    data = args.data or phantom_data(ROOT / "data" / "bench", 600, 256)
    files = args.params or [ROOT / "params" / "demo" / name for name in DEMO]
    print(f"machine: {machine()}")
    print(f"{'recipe':32s} {'estimate':>10s} {'real':>10s} {'real/est':>9s}")
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "LUNGS_OUTPUTS": out, "LUNGS_PROGRESS": "off"}
        for path in files:
            overrides = [f"data_dir={data}", *args.param]  # each its own run_name: a mask run is found by name
            values = P.load(path, overrides)
            guess = estimate.for_params(values)
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "lungs_utils", "train", str(path),
                                   *[a for o in overrides for a in ("-p", o)]], env=env, capture_output=True, text=True)
            real = time.perf_counter() - t0
            if done.returncode != 0:
                print(f"{path.name}: failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            print(f"{path.name:32s} {guess.seconds / 60:9.2f}m {real / 60:9.2f}m {real / guess.seconds:9.2f}")
            print(f"  {guess.line(detail=True)}")


if __name__ == "__main__":
    main()
