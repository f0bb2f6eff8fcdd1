"""Copy a dataset in the competition layout and burn a small marker into most COVID-19 images.

The README's shortcut-audit figures on real X-rays come from a copy of COVID-QU-Ex made with it: the
same bright corner tag as ``lungs phantom --shortcut`` (:func:`lungs_utils.xrays.phantom.burn_marker`) on a
seeded 90 % of the COVID-19 images, train and test alike (the test labels come from the answer key
beside ``data/``). A classifier trained on the copy can score by the tag alone; the audit must say so::

    python docs/make_shortcut_copy.py QU_DEV /tmp/qu-marked   # QU_DEV: a folder holding data/ and test_answers.csv
    lungs train params/cpu_small.yaml -p data_dir=/tmp/qu-marked/data -p run_name=marked
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lungs_utils.xrays.phantom import SHORTCUT_CLASS, burn_marker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="folder holding data/ and test_answers.csv")
    ap.add_argument("dst", type=Path, help="new folder (must not exist)")
    ap.add_argument("--share", type=float, default=0.9, help="share of COVID-19 images marked (default 0.9)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shutil.copytree(args.src, args.dst)
    rng = np.random.default_rng(args.seed)
    marked = 0
    for folder, answers in (("train_images", args.dst / "data" / "train_answers.csv"),
                            ("test_images", args.dst / "test_answers.csv")):
        labels = pd.read_csv(answers)
        for image_id in labels.loc[labels["target_feature"] == SHORTCUT_CLASS, "id"]:
            if rng.random() >= args.share:
                continue
            path = args.dst / "data" / folder / f"img_{image_id}.png"
            Image.fromarray(burn_marker(np.asarray(Image.open(path).convert("L")))).save(path)
            marked += 1
    print(f"{args.dst}: {marked} COVID-19 images marked")


if __name__ == "__main__":
    main()
