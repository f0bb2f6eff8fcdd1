"""DDP on CPU: torchrun with 2 gloo processes trains, and its distributed validation metrics equal a
single-process evaluation of the same checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
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


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path: Path) -> None:
    phantom.generate(tmp_path / "ph", n_train=45, n_test=6, size=32, seed=1)
    run_dir = tmp_path / "run"
    spec = {"notebook": "10_simple_cnn.ipynb", "run_name": "ddp", "data_dir": str(tmp_path / "ph" / "data"),
            "output_dir": str(run_dir), "model": "simple_cnn", "image_size": 32, "epochs": 2,
            "batch_size": 8, "seed": 0, "device": "cpu", "val_fraction": 0.3}
    params_file = tmp_path / "ddp.yaml"
    params_file.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LUNGS_PROGRESS": "off"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "lungs_utils", "train", str(params_file)],
                         capture_output=True, text=True, env=env, timeout=600)
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LUNGS_PROGRESS": "off"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "lungs_utils", "train", str(params_file)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("model", models.names())
def test_every_model_trains_under_two_process_ddp(model: str, ddp_data: Path, tmp_path: Path) -> None:
    spec = {"notebook": "10_simple_cnn.ipynb", "run_name": "ddp", "data_dir": str(ddp_data),
            "output_dir": str(tmp_path / "run"), "model": model, "image_size": 32, "epochs": 1,
            "batch_size": 4, "seed": 0, "device": "cpu", "val_fraction": 0.3, "tta": False}
    out = _torchrun(spec, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "submission.csv").is_file()


@pytest.mark.slow
def test_segmentation_trains_under_two_process_ddp(ddp_data: Path, tmp_path: Path) -> None:
    spec = {"notebook": "05_lung_segmentation.ipynb", "run_name": "ddp_seg", "data_dir": str(ddp_data),
            "output_dir": str(tmp_path / "seg"), "model": "unet_small", "image_size": 32, "epochs": 1,
            "batch_size": 4, "seed": 0, "device": "cpu", "cv": 2}
    out = _torchrun(spec, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("out-of-fold Dice") == 1  # rank 0 reports and writes
    assert len(list((tmp_path / "seg" / "masks" / "test").glob("*.png"))) == 4
