"""Multi-process training through torch.distributed (launched by torchrun).

``torchrun --nproc_per_node=N -m lungs_utils train PARAMS.yaml`` sets RANK / WORLD_SIZE / LOCAL_RANK;
:func:`train_from_params` joins the process group (nccl on GPUs, gloo on CPU), runs the experiment —
``train.fit`` wraps the model in DistributedDataParallel and sums metrics across ranks — and only
rank 0 writes the run folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    """True inside a torchrun worker with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_process_group() -> tuple[int, int]:
    """Join the group torchrun set up; returns (rank, world size). A no-op outside torchrun."""
    if not launched_by_torchrun():
        return 0, 1
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def train_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Run one experiment (lung segmentation when the params name its notebook, else classification),
    distributed when launched by torchrun; returns its metrics."""
    from . import experiment, segmentation

    rank, _world = init_process_group()
    try:
        if params["notebook"] == segmentation.NOTEBOOK:
            return segmentation.run(params, progress=rank == 0).outputs.get("metrics", {})
        exp = experiment.run(params, progress=rank == 0)
        return exp.outputs["metrics"]
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def main(params_path: str, overrides: Iterable[str] = (), on_exists: str = "error") -> int:
    """``lungs train PARAMS.yaml [-p k=v ...]``: train without papermill (torchrun-friendly).

    Rank 0 claims the run folder like ``lungs run`` does (an existing folder is refused unless
    resumed or suffixed; a lock keeps a second run of the same name out); under torchrun a failing
    rank 0 takes the other ranks down with it.
    """
    from .params import load
    from .runner import claimed

    values = load(params_path, list(overrides))
    if int(os.environ.get("RANK", "0")) != 0:
        train_from_params(values)
        return 0
    with claimed(values, on_exists):
        metrics = train_from_params(values)
    if metrics.get("task") == "segmentation":
        print(f"out-of-fold Dice {metrics['val_dice']:.4f}  IoU {metrics['val_iou']:.4f}  masks: {metrics['masks_dir']}")
    else:
        ci = metrics.get("val_macro_f1_ci")
        interval = f" (95% CI {ci[0]:.4f} to {ci[1]:.4f}, {metrics['n_val']} images)" if ci else ""
        which = "out-of-fold" if metrics.get("cv") else "val"
        print(f"{which} macro-F1 {metrics['val_macro_f1']:.4f}{interval}  accuracy {metrics['val_accuracy']:.4f}")
    return 0
