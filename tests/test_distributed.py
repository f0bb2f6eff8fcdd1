"""DDP on CPU: torchrun with 2 gloo processes trains, and its distributed validation metrics equal a
single-process evaluation of the same checkpoint."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from lungs_utils.xrays import data as D
from lungs_utils import models
from lungs_utils.xrays import phantom
from lungs_utils import params as P
from lungs_utils.engine import loop as T
from lungs_utils.engine import checkpoint as Ck
from lungs_utils.runs import torchrun
from lungs_utils.runs.torchrun import worker_env


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path: Path) -> None:
    phantom.generate(tmp_path / "ph", n_train=45, n_test=6, size=32, seed=1)
    run_dir = tmp_path / "run"
    spec = {"notebook": "10_simple_cnn.ipynb", "run_name": "ddp", "data_dir": str(tmp_path / "ph" / "data"),
            "output_dir": str(run_dir), "model": "simple_cnn", "image_size": 32, "epochs": 2,
            "batch_size": 8, "seed": 0, "device": "cpu", "val_fraction": 0.3}
    params_file = tmp_path / "ddp.yaml"
    params_file.write_text(yaml.safe_dump(spec))
    env = worker_env({**os.environ, "OMP_NUM_THREADS": "1", "LUNGS_PROGRESS": "off"})
    out = subprocess.run(torchrun.command(params_file, 2), capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "val macro-F1" in out.stdout and out.stdout.count("val macro-F1") == 1  # rank 0 only
    for name in ("params.yaml", "history.csv", "metrics.json", "submission.csv", "checkpoints/best.pt"):
        assert (run_dir / name).exists(), name

    # The best checkpoint's metrics were summed across the two ranks (each saw half the val set).
    state = Ck.load_checkpoint(run_dir / "checkpoints" / "best.pt")
    params = P.load(params_file)
    data = D.load(params["data_dir"], progress=False)
    split = D.split_for(data, params["val_fraction"], params["seed"]).part(0)
    _, val, _ = D.datasets(data, split)
    model = models.build("simple_cnn")
    Ck.load_weights(model, state)
    _, single = T.evaluate(model, val, params, torch.device("cpu"))
    assert single["confusion_matrix"] == state["val_metrics"]["confusion_matrix"]
    assert single["macro_f1"] == pytest.approx(state["val_metrics"]["macro_f1"])
    assert sum(map(sum, single["confusion_matrix"])) == len(val)


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    phantom.generate(root / "ph", n_train=30, n_test=4, size=32, seed=2, workers=1)
    return root / "ph" / "data"


def _torchrun(spec: dict, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    params_file = tmp_path / "ddp.yaml"
    params_file.write_text(yaml.safe_dump(spec))
    env = worker_env({**os.environ, "OMP_NUM_THREADS": "1", "LUNGS_PROGRESS": "off"})
    return subprocess.run(torchrun.command(params_file, 2), capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_every_model_trains_under_two_process_ddp(ddp_data: Path) -> None:
    """Every registered model through the real training loop under DDP (one torchrun launch for all of
    them: a launch per model cost three torch imports each), with the two replicas' weights equal after the
    epoch; the run-folder side of a DDP run is the simple CNN's test above."""
    worker = Path(__file__).parent / "fakes" / "ddp_every_model.py"
    env = worker_env({**os.environ, "OMP_NUM_THREADS": "1", "LUNGS_PROGRESS": "off"})
    out = subprocess.run([*torchrun.torchrun(2), str(worker), str(ddp_data)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    trained = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("trained ")]
    assert trained == models.names(), out.stdout


@pytest.mark.slow
def test_segmentation_trains_under_two_process_ddp(ddp_data: Path, tmp_path: Path) -> None:
    spec = {"notebook": "05_lung_segmentation.ipynb", "run_name": "ddp_seg", "data_dir": str(ddp_data),
            "output_dir": str(tmp_path / "seg"), "model": "unet_small", "image_size": 32, "epochs": 1,
            "batch_size": 4, "seed": 0, "device": "cpu", "cv": 2}
    out = _torchrun(spec, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("out-of-fold Dice") == 1  # rank 0 reports and writes
    assert len(list((tmp_path / "seg" / "masks" / "test").glob("*.png"))) == 4


_ALL_REDUCE = """import torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.ones(1)
dist.all_reduce(x)
print(f"rank {dist.get_rank()} sum {int(x.item())}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_starts_where_the_host_name_does_not_resolve(tmp_path: Path) -> None:
    """A fresh CI machine whose host name resolved nowhere made every torchrun launch retry the name for
    minutes (CI ran out of time). In a mount namespace with an /etc/hosts that lacks the host name and a
    resolver that answers nothing, the launcher's torchrun must still start two gloo workers at once
    (without ``--local-addr`` this hangs: measured 90 s with no step, 2026-12-06)."""
    import shutil
    import socket

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to give the test its own /etc/hosts")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    (tmp_path / "resolv.conf").write_text("nameserver 10.255.255.1\noptions timeout:1 attempts:1\n")
    (tmp_path / "reduce.py").write_text(_ALL_REDUCE)
    launch = " ".join([*torchrun.torchrun(2), str(tmp_path / "reduce.py")])
    script = (f"mount --bind {tmp_path / 'hosts'} /etc/hosts && mount --bind {tmp_path / 'resolv.conf'} "
              f"/etc/resolv.conf && ! getent hosts {socket.gethostname()} && {launch}")
    env = worker_env({**os.environ, "OMP_NUM_THREADS": "1"})
    out = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, env=env,
                         timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "rank 0 sum 2" in out.stdout and "rank 1 sum 2" in out.stdout, out.stdout  # both joined, summed
