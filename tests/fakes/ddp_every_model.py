"""A torchrun worker for tests/test_distributed.py: every registered model through the real training loop
(:func:`lungs_utils.engine.loop.fit`, which wraps it in DistributedDataParallel) for one epoch, in one
launch rather than one launch per model.

Usage: ``torchrun --standalone --nproc_per_node=2 tests/fakes/ddp_every_model.py DATA_DIR``. Rank 0 prints
``trained MODEL val_macro_f1=F weights=S`` per model; every rank checks that its weights equal rank 0's
(DDP keeps the replicas in step) and exits non-zero naming the model where they differ.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from lungs_utils import models
from lungs_utils import params as P
from lungs_utils.engine import distributed
from lungs_utils.engine import loop
from lungs_utils.xrays import data as D


def main(data_dir: str) -> None:
    rank, world = distributed.init_process_group()
    assert world == 2, world
    data = D.load(data_dir, progress=False)
    for name in models.names():
        params = P.resolve({"model": name, "data_dir": data_dir, "image_size": 32, "epochs": 1, "batch_size": 4,
                            "seed": 0, "device": "cpu", "val_fraction": 0.3, "tta": False, "num_workers": 0})
        split = D.split_for(data, params["val_fraction"], params["seed"]).part(0)
        train, val, _ = D.datasets(data, split, use_masks=params["masks"] == "channel")
        model = models.for_params(params)
        result = loop.fit(model, train, val, params, progress=False)
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        first = distributed.broadcast_from_first(flat.clone())
        if not torch.equal(flat, first):
            raise SystemExit(f"{name}: rank {rank}'s weights differ from rank 0's after a DDP epoch")
        if rank == 0:
            print(f"trained {name} val_macro_f1={result.best_metrics['macro_f1']:.3f} "
                  f"weights={float(flat.double().sum()):.6f}", flush=True)
    dist.barrier()
    distributed.leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
