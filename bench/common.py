"""Shared benchmark plumbing: a phantom dataset at benchmark size, the per-item PIL baseline that mimics
the original project, and timing helpers. Every benchmark measures ours and the baseline side by side in
one process run and prints the figures and the ratio."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from lungs_utils.hardware import describe_cpu

ROOT = Path(__file__).resolve().parents[1]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--n", type=int, default=1200, help="phantom train images (default 1200)")
    p.add_argument("--size", type=int, default=256, help="phantom image size (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "bench", help="where the phantom set lives")
    return p


def phantom_data(folder: Path, n: int, size: int) -> Path:
    """A phantom dataset for benchmarks (generated once, reused)."""
    from lungs_utils.xrays import phantom

    target = folder / f"n{n}_s{size}"
    if not (target / "data" / "train_images").is_dir():
        phantom.generate(target, n_train=n, n_test=max(n // 5, 10), size=size, seed=0)
    return target / "data"


def machine() -> str:
    """The machine in one line, e.g. ``AMD EPYC, 2 cores, AVX512-BF16, no GPU, torch 2.14.1, 2 threads``: the
    CPU's instruction set decides CPU figures (bf16 or not), so it goes with every benchmark's numbers."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{describe_cpu()}, {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def rate(fn: Callable[[], int], min_seconds: float = 3.0, sync: bool = False) -> float:
    """Images per second of ``fn`` (which returns the number of images it processed)."""
    done, start = 0, time.perf_counter()
    while True:
        done += fn()
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


class PilBaseline(torch.utils.data.Dataset):
    """What the original project did per item: open the PNG with PIL, convert to RGB, resize, and
    jitter brightness / contrast / sharpness per image, then to a normalised float tensor."""

    def __init__(self, data_dir: Path, size: int, seed: int = 0) -> None:
        import pandas as pd

        table = pd.read_csv(data_dir / "train_answers.csv")
        self.paths = [data_dir / "train_images" / f"img_{i}.png" for i in table["id"]]
        self.labels = table["target_feature"].to_numpy()
        self.size = size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms import functional as TF

        im = Image.open(self.paths[i]).convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Sharpness):
            im = enhance(im).enhance(float(self.rng.uniform(0.8, 1.2)))
        if self.rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = TF.normalize(TF.to_tensor(im), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        return x, int(self.labels[i])


def baseline_loader(data_dir: Path, size: int, batch_size: int) -> torch.utils.data.DataLoader:
    """The baseline's DataLoader, default settings (no workers, shuffle like training)."""
    return torch.utils.data.DataLoader(PilBaseline(data_dir, size), batch_size=batch_size, shuffle=True)


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
