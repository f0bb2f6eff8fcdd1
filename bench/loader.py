"""Images/s delivered as augmented training batches: our decode-once cache + batched tensor augmentation
vs a per-item PIL pipeline like the original project's (same images, same batch size, one run).

    python bench/loader.py [--n 1200] [--size 256] [--batch-size 32] [--device cpu|cuda]
"""

from __future__ import annotations

import time

import torch

from common import baseline_loader, machine, parser, phantom_data, table

from lungs_utils.xrays import data as D
from lungs_utils import params as P
from lungs_utils.xrays import presets


def main() -> None:
    args = parser(__doc__).parse_args()
    device = torch.device(args.device)
    data_dir = phantom_data(args.data, args.n, args.size)
    t0 = time.perf_counter()
    data = D.load(data_dir, cache_dir=args.data / "cache", progress=False)
    cache_s = time.perf_counter() - t0
    common = {"image_size": args.size, "batch_size": args.batch_size}
    # The baseline's own augmentations (flip, brightness, contrast, sharpness on every image) ...
    same = P.load(overrides={**common, "hflip": 0.5, "rotate": 0.0, "translate": 0.0, "scale": 0.0,
                             "brightness": 0.2, "contrast": 0.2, "sharpness": 1.0})
    # ... and the suite's default recipe, which adds rotation / shift / zoom (one grid_sample per batch).
    full = P.load(overrides={**common, "equalize": 0.1, "sharpness": 0.1})
    train = D.XrayDataset(data.train.images, data.train.ids, data.labels["target_feature"])
    generator = torch.Generator().manual_seed(0)

    def ours_epoch(limit: int, params: dict) -> int:
        loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True,
                                             pin_memory=device.type == "cuda")
        n = 0
        for x, y, _ in loader:
            x = presets.train_batch(x.to(device, non_blocking=True), params, generator)
            n += x.shape[0]
            if n >= limit:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n

    def baseline_epoch(limit: int) -> int:
        n = 0
        for x, _y in baseline_loader(data_dir, args.size, args.batch_size):
            x = x.to(device)
            n += x.shape[0]
            if n >= limit:
                break
        return n

    ours_epoch(args.batch_size * 2, full)  # warm-up (allocator, page cache)
    baseline_epoch(args.batch_size * 2)
    t = time.perf_counter()
    n_base = baseline_epoch(min(len(train), 600))
    base = n_base / (time.perf_counter() - t)
    rates = {}
    for name, params in (("same", same), ("full", full)):
        t = time.perf_counter()
        n = sum(ours_epoch(len(train), params) for _ in range(3))  # three epochs: a steadier figure
        rates[name] = n / (time.perf_counter() - t)
    print(f"machine: {machine()}")
    print(f"data: {len(train)} phantom images at {args.size}px, batch {args.batch_size}, device {device}; "
          f"cache build (decode once) {cache_s:.1f} s")
    print(table([("pipeline", "images/s", "vs baseline"),
                 ("baseline: PIL per item, RGB, flip + brightness/contrast/sharpness", f"{base:,.0f}", "1.0x"),
                 ("ours, the same augmentations, batched on tensors", f"{rates['same']:,.0f}",
                  f"{rates['same'] / base:.1f}x"),
                 ("ours, default recipe (+ rotation/shift/zoom, equalize, sharpness)", f"{rates['full']:,.0f}",
                  f"{rates['full'] / base:.1f}x")]))


if __name__ == "__main__":
    main()
