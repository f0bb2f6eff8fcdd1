"""Start-up cost of the commands that neither train nor predict: wall time, peak memory, and whether
PyTorch got imported, for each command run as a user runs it (a fresh process, real small inputs).

    python bench/startup.py [--repeat 3]

The reference is ``lungs --help`` (the CLI alone) and, side by side, ``import torch`` on its own: a
command that stays near the first and far below the second imports only what it uses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lungs_utils.hardware import describe_cpu

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import json, sys\nfrom lungs_utils.app.cli import main\n"
         "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
         "print('\\n' + json.dumps({'code': code, 'torch': 'torch' in sys.modules}), file=sys.stderr)")


def measure(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    """One fresh process: wall seconds, peak RSS (MB), exit code and whether torch was imported."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PROBE, *args], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read()
    proc.stderr.close()
    tail = json.loads(err.strip().splitlines()[-1]) if err.strip() else {"code": None, "torch": None}
    return {"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, **tail}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per command (the median is shown)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lungs-startup-") as tmp:
        home = Path(tmp)
        for sub in ("params", "notebooks"):
            (home / sub).mkdir()
        env = {**os.environ, "LUNGS_HOME": str(home), "LUNGS_OUTPUTS": str(home / "outputs"),
               "HOME": str(home), "LUNGS_PROGRESS": "off", "KAGGLE_CONFIG_DIR": str(home / "no-kaggle")}
        for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
            env.pop(var, None)
        subprocess.run([sys.executable, "-m", "lungs_utils", "phantom", str(home / "ph"), "--train", "30",
                        "--test", "200", "--size", "32"], env=env, check=True, capture_output=True)
        truth = home / "ph" / "test_answers.csv"
        commands = {
            "lungs --help": ["--help"],
            "lungs score (200 rows)": ["score", str(truth), "--answers", str(truth)],
            "lungs leaderboard (no runs)": ["leaderboard"],
            "lungs report (no runs)": ["report"],
            "lungs submit: validation, then no credentials": ["submit", str(truth), "-m", "x", "--data",
                                                              str(home / "ph" / "data")],
            "lungs kaggle-kernel (writes the kernel)": ["kaggle-kernel", str(ROOT / "params" / "10_simple_cnn.yaml"), "--out",
                                    str(home / "kernel"), "--user", "someone"],
        }
        rows = []
        torch_alone = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", "import torch"], env=env)
            _, _, usage = os.wait4(proc.pid, 0)
            torch_alone.append((time.perf_counter() - start, usage.ru_maxrss / 1024))
        for name, argv in commands.items():
            runs = []
            for _ in range(args.repeat):
                if argv[0] == "kaggle-kernel":
                    subprocess.run(["rm", "-rf", str(home / "kernel")])
                runs.append(measure(argv, env, home))
            runs.sort(key=lambda r: r["seconds"])
            rows.append((name, runs[len(runs) // 2]))
    seconds, rss = sorted(torch_alone)[len(torch_alone) // 2]
    # describe_cpu, not common.machine(): this benchmark's own process stays without torch.
    print(f"machine: {describe_cpu()}, Python {sys.version.split()[0]}; median of {args.repeat} fresh processes")
    print(f"{'command':50s} {'seconds':>8s} {'peak MB':>8s} {'exit':>5s}  imports torch")
    label = 'python -c "import torch" (for comparison)'
    print(f"{label:50s} {seconds:8.2f} {rss:8.0f} {'':>5s}  yes")
    for name, r in rows:
        print(f"{name:50s} {r['seconds']:8.2f} {r['rss_mb']:8.0f} {str(r['code']):>5s}  {'yes' if r['torch'] else 'no'}")


if __name__ == "__main__":
    main()
