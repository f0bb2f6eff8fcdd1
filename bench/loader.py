"""Images/s delivered as augmented training batches: our decode-once cache + batched tensor augmentation
vs a per-item PIL pipeline like the original project's (same images, same batch size, one run).

    python bench/loader.py [--n 1200] [--size 256] [--batch-size 32] [--device cpu|cuda]
"""

from __future__ import annotations

import time

import torch

from common import baseline_loader, machine, parser, phantom_data, table

from lungs_utils import data as D
from lungs_utils import params as P
from lungs_utils import presets


def main() -> None:
    args = parser(__doc__).parse_args()
    device = torch.device(args.device)
    data_dir = phantom_data(args.data, args.n, args.size)
    t0 = time.perf_counter()
    data = D.load(data_dir, cache_dir=args.data / "cache", progress=False)
    cache_s = time.perf_counter() - t0
    params = P.load(overrides={"image_size": args.size, "batch_size": args.batch_size, "equalize": 0.1,
                               "sharpness": 0.1})
    train = D.XrayDataset(data.train.images, data.train.ids, data.labels["target_feature"])
    generator = torch.Generator().manual_seed(0)

    def ours_epoch(limit: int) -> int:
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

    ours_epoch(args.batch_size * 2)  # warm-up (allocator, page cache)
    baseline_epoch(args.batch_size * 2)
    t = time.perf_counter()
    n_ours = ours_epoch(len(train))
    ours = n_ours / (time.perf_counter() - t)
    t = time.perf_counter()
    n_base = baseline_epoch(min(len(train), 600))
    base = n_base / (time.perf_counter() - t)
    print(f"machine: {machine()}")
    print(f"data: {len(train)} phantom images at {args.size}px, batch {args.batch_size}, device {device}; "
          f"cache build (decode once) {cache_s:.1f} s")
    print(table([("pipeline", "images/s"),
                 ("baseline: PIL per item, RGB, PIL enhance", f"{base:,.0f}"),
                 ("ours: uint8 cache + batched tensor augmentation", f"{ours:,.0f}"),
                 ("ratio ours / baseline", f"{ours / base:.1f}x")]))


if __name__ == "__main__":
    main()
