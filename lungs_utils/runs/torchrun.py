"""Training in several processes from a notebook or ``lungs run``: torchrun started on the run folder's
``params.yaml`` (one process per GPU, e.g. Kaggle's "GPU T4 x2"; gloo on a CPU), its log shown as it comes
and kept in ``torchrun.log``. Each worker runs ``lungs train`` (:func:`lungs_utils.runs.runner.train`);
what happens inside a worker is :mod:`lungs_utils.engine.distributed`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import LungsError, failure_line
from ..paths import CLAIMED_ENV, ESTIMATE_ENV, child_pythonpath
from ..runfolder import PARAMS_FILE, TORCHRUN_LOG


def torchrun(nproc: int) -> list[str]:
    """``torchrun`` with this Python, for ``nproc`` processes on this machine.

    ``--local-addr 127.0.0.1``: the workers reach the rendezvous store on loopback. Left to itself torchrun
    publishes the machine's host name, and where that name does not resolve (seen on a fresh CI machine)
    every worker retries it for minutes before the first step."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--local-addr", "127.0.0.1"]


def worker_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for torchrun's workers: on Linux gloo binds to loopback (``GLOO_SOCKET_IFNAME=lo``, unless
    set) instead of resolving the host name, for the same reason as ``--local-addr``."""
    if sys.platform.startswith("linux"):
        env = {"GLOO_SOCKET_IFNAME": "lo", **env}
    return env


def command(params_file: Path, nproc: int) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N --local-addr 127.0.0.1 -m lungs_utils train PARAMS``."""
    return [*torchrun(nproc), "-m", "lungs_utils", "train", str(params_file)]


def launch(run_dir: Path, nproc: int, expected: str = "") -> None:
    """Train the run in ``run_dir`` (every fold of a cross-validation run) in ``nproc`` torchrun processes
    and wait for them; a failure is one error line (a rank's own, else torchrun's last word) pointing at
    the log. ``expected`` is the estimate already said here: the workers repeat it."""
    env = worker_env({**os.environ, "PYTHONPATH": child_pythonpath(),
                      # The caller claimed the folder: the workers write into it, clearing nothing.
                      CLAIMED_ENV: str(run_dir.resolve()), ESTIMATE_ENV: expected})
    cmd = command(run_dir / PARAMS_FILE, nproc)
    print("$", " ".join(cmd[1:]), flush=True)
    log_path = run_dir / TORCHRUN_LOG
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # type: ignore[union-attr]
            log.write(line)
            print(line, end="", flush=True)
        code = proc.wait()
    if code != 0:
        raise LungsError(f"torchrun with {nproc} processes failed (exit {code}): "
                         f"{failure_line(log_path)[:300]}; the whole log is in {log_path}")
