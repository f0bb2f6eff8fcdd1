"""Test-set inference images/s with and without TTA, over a batch-size sweep.

    python bench/predict.py [--model resnet_tiny] [--n 600] [--batches 16 64 256]
"""

from __future__ import annotations

import time

import torch

from common import machine, parser, phantom_data, table

from lungs_utils.xrays import data as D
from lungs_utils import models
from lungs_utils.engine.predict import PredictSettings, predict_proba
from lungs_utils.engine.device import autocast_dtype


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="resnet_tiny")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.set_defaults(n=600)
    args = p.parse_args()
    device = torch.device(args.device)
    data = D.load(phantom_data(args.data, args.n, args.size), cache_dir=args.data / "cache", progress=False)
    test = D.XrayDataset(data.test.images, data.test.ids)
    model = models.build(args.model).to(device, memory_format=torch.channels_last)
    dtype = autocast_dtype(device, args.precision)
    rows = [("batch", "plain img/s", "TTA (4 views) img/s")]
    for batch in args.batches:
        cells = []
        for tta in (False, True):
            settings = PredictSettings(image_size=args.size, device=device, dtype=dtype, batch_size=batch, tta=tta,
                                       channels_last=True)
            predict_proba(model, torch.utils.data.Subset(test, range(min(len(test), batch))), settings)
            t = time.perf_counter()
            predict_proba(model, test, settings)
            if device.type == "cuda":
                torch.cuda.synchronize()
            cells.append(f"{len(test) / (time.perf_counter() - t):,.0f}")
        rows.append((str(batch), *cells))
    print(f"machine: {machine()}; model {args.model} at {args.size}px, {len(test)} test images, "
          f"precision {args.precision}")
    print(table(rows))


if __name__ == "__main__":
    main()
