"""The user manual (README.md and docs/*.md) says what the suite does: every shell command it shows is run.

How: every fenced block whose info string is ``bash``, ``sh`` or ``console`` (``$ `` lines) is read, line
continuations joined and ``# comments`` dropped; each command line found is then either

- **run** here (``STEPS``, in order, in one isolated project: its own ``LUNGS_HOME`` with the suite's
  ``params/`` and ``notebooks/``, ``HOME``, caches and outputs), exactly as written through ``bash -c``,
  with placeholders replaced (``QU_DEV`` → a small phantom set with its answer key, ``path/to/films`` →
  its test films, ``YOUR_KAGGLE_NAME`` → the fake Kaggle user) and shrink overrides appended (1 epoch at
  32 px); each step checks what the command left behind, not just its exit status, and the commands the
  docs show failing must fail with the documented message; or
- **mapped** (``COVERED``) to the tests that already run it (``make test`` is CI's, ``lungs demo`` is
  tests/test_notebooks.py's), and those tests must still exist.

A command in the docs that is neither makes :func:`test_every_documented_command_is_run_or_mapped` fail,
and so does a step or a mapping whose command left the docs.

Kaggle is fake: ``tests/fakes`` holds a ``kaggle`` package (the API lungs_utils calls) and a ``kaggle``
command (``kernels push / status / output``), first on ``PYTHONPATH`` and ``PATH``, with its state in a
folder (see tests/fakes/kaggle/server.py): the competition is a small phantom set, and every download,
submission and pushed notebook lands there, where the steps check it. Nothing reaches the network.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FAKES = ROOT / "tests" / "fakes"
MANUAL = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
KAGGLE_USER = "docs-tester"
#: What every training command gets appended in the steps: the recipe at toy size.
SHRINK = ("-p", "epochs=1", "-p", "image_size=32", "-p", "start_size=null", "-p", "batch_size=8")
#: A phantom dataset's size for the tests (the fake competition and QU_DEV alike).
PHANTOM_SIZE = ("--train", "36", "--test", "9", "--size", "32")
N_TRAIN, N_TEST = 36, 9


# ------------------------------------------------------------------------------------------------
# Reading the commands out of the manual
# ------------------------------------------------------------------------------------------------
def _strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` at the start or after a blank, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def block_commands(info: str, body: list[str]) -> list[str]:
    """The commands of one fenced block: ``console`` blocks only their ``$ `` lines; continuations joined."""
    lines = body
    if info == "console":
        lines = [l[2:] for l in body if l.startswith("$ ")]
    commands, pending = [], ""
    for raw in lines:
        line = _strip_comment(raw)
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            commands.append(" ".join(line.split()))
    return commands


def documented() -> dict[str, list[str]]:
    """Every command the manual shows, with where it is shown (``file:line`` of its block)."""
    found: dict[str, list[str]] = {}
    for path in MANUAL:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^(`{3,})\s*([\w+-]*)", lines[i])
            if not fence:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
            if fence.group(2).lower() in SHELL_BLOCKS:
                for command in block_commands(fence.group(2).lower(), lines[i + 1:end]):
                    found.setdefault(command, []).append(f"{path.relative_to(ROOT)}:{i + 1}")
            i = end + 1
    return found


# ------------------------------------------------------------------------------------------------
# The project the steps run in
# ------------------------------------------------------------------------------------------------
@dataclass
class Project:
    home: Path
    qu_dev: Path  # a labelled set with its answer key, in qu-dev's layout (QU_DEV/data, QU_DEV/test_answers.csv)
    server: Path  # the fake Kaggle's state
    env: dict[str, str]

    def substitute(self, command: str) -> str:
        for placeholder, value in (("path/to/films", self.qu_dev / "data" / "test_images"),
                                   ("path/to/answers.csv", self.qu_dev / "test_answers.csv"),
                                   ("QU_DEV", self.qu_dev), ("YOUR_KAGGLE_NAME", KAGGLE_USER)):
            command = command.replace(placeholder, str(value))
        return command

    def run(self, command: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        line = self.substitute(command) + "".join(f" {a}" for a in extra)
        return subprocess.run(["bash", "-c", line], cwd=self.home, env=self.env, capture_output=True, text=True,
                              timeout=300)

    @property
    def outputs(self) -> Path:
        return self.home / "outputs"

    def submissions(self) -> list[dict]:
        path = self.server / "submissions.jsonl"
        return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []

    def competition_test_ids(self) -> list[int]:
        return sorted(pd.read_csv(self.server / "competition" / "test_answers.csv")["id"])


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    from lungs_utils.xrays import phantom

    base = tmp_path_factory.mktemp("docs")
    home = base / "project"
    home.mkdir()
    for name in ("params", "notebooks"):  # the suite's own, read-only; everything else is this project's
        (home / name).symlink_to(ROOT / name)
    (home / "Downloads").mkdir()  # where a browser saves the Kaggle token
    (home / "Downloads" / "kaggle.json").write_text(json.dumps({"username": KAGGLE_USER, "key": "0" * 32}))
    qu_dev = base / "qu-dev"
    phantom.generate(qu_dev, n_train=N_TRAIN, n_test=N_TEST, size=32, seed=3, workers=1)
    (qu_dev / phantom.MARKER).unlink()  # stands for a real labelled set
    bin_dir = base / "bin"
    bin_dir.mkdir()
    lungs = bin_dir / "lungs"
    lungs.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lungs_utils "$@"\n')
    lungs.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LUNGS_", "KAGGLE_", "FAKE_KAGGLE_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(HOME=str(home), LUNGS_HOME=str(home), LUNGS_KAGGLE_INPUT=str(base / "no-kaggle-input"),
               LUNGS_PROGRESS="plain", XDG_CONFIG_HOME=str(home / ".config"), MPLBACKEND="Agg",
               PATH=os.pathsep.join([str(bin_dir), str(FAKES / "bin"), os.environ["PATH"]]),
               PYTHONPATH=os.pathsep.join([str(FAKES), str(ROOT)]),
               FAKE_KAGGLE_SERVER=str(base / "kaggle-server"), FAKE_KAGGLE_PYTHON=sys.executable,
               FAKE_KAGGLE_TRAIN=str(N_TRAIN), FAKE_KAGGLE_TEST=str(N_TEST), FAKE_KAGGLE_SIZE="32",
               KAGGLE_USERNAME=KAGGLE_USER, KAGGLE_KEY="0" * 32)
    return Project(home=home, qu_dev=qu_dev, server=base / "kaggle-server", env=env)


# ------------------------------------------------------------------------------------------------
# The steps: each command the manual shows, in the order a reader meets them
# ------------------------------------------------------------------------------------------------
Check = Callable[[subprocess.CompletedProcess[str], Project], None]


@dataclass(frozen=True)
class Step:
    command: str  # exactly as the manual shows it (whitespace collapsed, comment dropped)
    extra: tuple[str, ...] = ()  # appended when run: shrink overrides
    check: Check | None = None
    fails: str | None = None  # the documented failure: exit status 2 and this in its error line


def _metrics(project: Project, run: str) -> dict:
    return json.loads((project.outputs / run / "metrics.json").read_text())


def _submission_covers(path: Path, ids: list[int]) -> None:
    table = pd.read_csv(path)
    assert list(table.columns) == ["id", "target_feature"] and list(table["id"]) == ids
    assert set(table["target_feature"]) <= {0, 1, 2}


def _kaggle_credentials(proc, p: Project) -> None:
    token = p.home / ".kaggle" / "kaggle.json"
    assert json.loads(token.read_text())["username"] == KAGGLE_USER
    assert token.stat().st_mode & 0o777 == 0o600 and not (p.home / "Downloads" / "kaggle.json").exists()


def _downloaded(proc, p: Project) -> None:
    data = p.home / "data" / "competition" / "data"
    assert f"competition data ready: {data}" in proc.stdout
    assert len(pd.read_csv(data / "train_answers.csv")) == N_TRAIN
    assert len(list((data / "test_images").glob("img_*.png"))) == N_TEST


def _estimated(run: str) -> Check:
    def check(proc, p: Project) -> None:
        assert re.search(r"estimate: about [\d.]+ (s|min|h)\b.*on this machine", proc.stdout), proc.stdout
        assert not (p.outputs / run).exists()  # an estimate writes no run
    return check


def _trained(run: str, *, cv: int | None = None, data: str = "competition") -> Check:
    def check(proc, p: Project) -> None:
        folder = p.outputs / run
        assert f"run {run} ok" in proc.stdout and (folder / "15_modern.ipynb").is_file(), proc.stdout
        ids = p.competition_test_ids() if data == "competition" else sorted(
            pd.read_csv(p.qu_dev / "test_answers.csv")["id"])
        _submission_covers(folder / "submission.csv", ids)
        metrics = _metrics(p, run)
        assert 0 <= metrics["val_macro_f1"] <= 1
        if cv:
            assert metrics["cv"]["k"] == cv and len(pd.read_csv(folder / "oof_predictions.csv")) == N_TRAIN
    return check


def _submitted(file: str, message: str) -> Check:
    def check(proc, p: Project) -> None:
        last = p.submissions()[-1]
        assert last == {"file": str(p.home / file), "message": message,
                        "competition": "ml-intensive-yandex-academy-spring-2024", "rows": N_TEST, "user": KAGGLE_USER}
        assert f"submitted submission.csv ({N_TEST} rows)" in proc.stdout and "/submissions" in proc.stdout
    return check


def _resumed(proc, p: Project) -> None:
    assert json.loads((p.outputs / "cpu_small" / "run.json").read_text())["status"] == "ok"
    assert len(pd.read_csv(p.outputs / "cpu_small" / "history.csv")) == 1  # nothing retrained


def _bundle(folder: str, *, gpus: int = 1, pushed_version: int | None = None, per_fold: bool = False) -> Check:
    def check(proc, p: Project) -> None:
        meta = json.loads((p.home / folder / "kernel-metadata.json").read_text())
        slug = meta["id"].split("/")[1]
        assert meta["id"].startswith(f"{KAGGLE_USER}/") and (p.home / folder / meta["code_file"]).is_file()
        assert meta["competition_sources"] == ["ml-intensive-yandex-academy-spring-2024"] and meta["enable_gpu"]
        assert (meta.get("machine_shape") == "NvidiaTeslaT4") == (gpus == 2)
        assert f"expected on Kaggle ({gpus} x T4): about" in proc.stdout
        assert ("per fold" in proc.stdout) == per_fold
        if pushed_version:
            assert f"pushed {meta['id']} version {pushed_version};" in proc.stdout
            assert (p.server / "kernels" / KAGGLE_USER / slug / str(pushed_version) / meta["code_file"]).is_file()
    return check


def _swept_bundle(proc, p: Project) -> None:
    _bundle("kaggle/sweep")(proc, p)
    assert proc.stdout.count("a sweep of 30 trials, each expected on Kaggle") == 1  # one trial of cpu_small
    notebook = json.loads((p.home / "kaggle/sweep/97_sweep.ipynb").read_text())
    boot = "".join(notebook["cells"][1]["source"])
    carried = zipfile.ZipFile(io.BytesIO(base64.b64decode(re.search(r'_lungs_zip = "([^"]+)"', boot).group(1))))
    assert {"params/cpu_small.yaml", "params/sweep/cpu_space.yaml", "notebooks/15_modern.ipynb"} <= set(carried.namelist())


def _pushed_by_hand(proc, p: Project) -> None:
    assert "Kernel version 2 successfully pushed." in proc.stdout, proc.stdout  # --push made version 1
    pushed = p.server / "kernels" / KAGGLE_USER / "lungs-resnet18" / "2"
    assert json.loads((pushed / "kernel-metadata.json").read_text())["id"] == f"{KAGGLE_USER}/lungs-resnet18"


def _fetched(proc, p: Project) -> None:
    _submission_covers(p.home / "kaggle/resnet18-output/outputs/resnet18/submission.csv", p.competition_test_ids())


def _compared(proc, p: Project) -> None:
    lines = [l for l in proc.stdout.splitlines() if l.startswith("macro-F1")]
    assert len(lines) == 2 and "qu_cv-2/submission.csv vs" in proc.stdout and "paired over the same 9 images" in proc.stdout


def _leaderboard(proc, p: Project) -> None:
    board = pd.read_csv(p.outputs / "leaderboard.csv")
    assert {"cpu_small", "qu_cv", "qu_cv-2"} <= set(board["run"])
    assert yaml.safe_load((p.outputs / "qu_cv-2" / "params.yaml").read_text())["seed"] == 1


def _ensembled(proc, p: Project) -> None:
    assert "ensemble (mean)" in proc.stdout
    assert json.loads((p.outputs / "qu_cv_bag" / "ensemble.json").read_text())["method"] == "mean"
    _submission_covers(p.outputs / "qu_cv_bag" / "submission.csv", sorted(pd.read_csv(p.qu_dev / "test_answers.csv")["id"]))


def _pseudo_labelled(proc, p: Project) -> None:
    _trained("qu_cv_pseudo", cv=3, data="qu")(proc, p)
    threshold = yaml.safe_load((ROOT / "params" / "cpu_cv_pseudo.yaml").read_text())["pseudo_threshold"]
    source = pd.read_csv(p.outputs / "qu_cv" / "test_predictions.csv")[["p0", "p1", "p2"]].to_numpy()
    record = _metrics(p, "qu_cv_pseudo")["pseudo_labels"]
    assert record["run"] == "qu_cv" and record["threshold"] == threshold
    assert record["films"] == int((source.max(axis=1) >= threshold).sum()) and record["of_test"] == N_TEST


def _audited(proc, p: Project) -> None:
    assert proc.stdout.startswith("cpu_small:\naudited on") and "Grad-CAM attention inside the lungs" in proc.stdout
    audit = _metrics(p, "cpu_small")["audit"]
    assert audit["status"] == "ok" and {"hotspot", "lung_share", "blanking", "flags"} <= set(audit)
    assert (p.outputs / "cpu_small" / "audit.csv").is_file()


def _predicted(run: str, *, audit: bool) -> Check:
    def check(proc, p: Project) -> None:
        out = p.outputs / "predictions" / f"{run}-test_images"
        table = pd.read_csv(out / "predictions.csv")
        assert sorted(table["id"]) == sorted(pd.read_csv(p.qu_dev / "test_answers.csv")["id"])
        assert {"predicted", "p0", "p1", "p2", "inverted"} <= set(table.columns)
        assert "macro-F1" in proc.stdout and (out / "scores.json").is_file()
        assert (out / "audit.json").is_file() == audit
        # QU_DEV stands for real films (no PHANTOM.md): no phantom warning (tests/test_apply.py: the warning).
        assert "SYNTHETIC" not in proc.stderr
    return check


def _segmented(proc, p: Project) -> None:
    masks = p.outputs / "lung_masks" / "masks"
    assert len(list((masks / "test").glob("img_*.png"))) == N_TEST
    assert len(list((masks / "train_oof").glob("img_*.png"))) == N_TRAIN  # out-of-fold: every train film


def _channel(proc, p: Project) -> None:
    params = yaml.safe_load((p.outputs / "cpu_small_channel" / "params.yaml").read_text())
    assert (params["masks"], params["mask_run"]) == ("channel", "lung_masks")
    _trained("cpu_small_channel")(proc, p)


def _phantom(out: str, *, shortcut: bool) -> Check:
    def check(proc, p: Project) -> None:
        root = p.home / out
        assert len(pd.read_csv(root / "data" / "train_answers.csv")) == N_TRAIN
        assert len(pd.read_csv(root / "test_answers.csv")) == N_TEST and (root / "PHANTOM.md").is_file()
        assert (root / "data" / "test_images").is_dir() and (root / "data" / "train_lung_masks").is_dir()
        summary = (root / "PHANTOM.md").read_text()
        assert ("shortcut" in summary.lower()) == shortcut
    return check


STEPS = [
    # docs/kaggle.md: credentials, then the download every later step's data comes from
    Step("mkdir -p ~/.kaggle && mv ~/Downloads/kaggle.json ~/.kaggle/ && chmod 600 ~/.kaggle/kaggle.json",
         check=_kaggle_credentials),
    Step("lungs download", check=_downloaded),
    # README / docs/real-data.md: the first recipe on the competition data, and its submission
    Step("lungs run params/cpu_small.yaml --estimate", SHRINK, _estimated("cpu_small")),
    Step("lungs run params/cpu_cv.yaml --estimate", SHRINK, _estimated("cpu_cv")),
    Step("lungs run params/cpu_small.yaml", SHRINK, _trained("cpu_small")),
    Step('lungs submit outputs/cpu_small/submission.csv -m "cpu_small"',
         check=_submitted("outputs/cpu_small/submission.csv", "cpu_small")),
    # docs/commands.md: a run is never replaced silently; --resume continues it
    Step("lungs train params/cpu_small.yaml", SHRINK, fails="already holds a run"),
    Step("lungs train params/cpu_small.yaml --resume", SHRINK, _resumed),
    # README / docs/kaggle.md: a notebook on Kaggle's GPUs, with --push and by hand, and its submission
    Step("lungs kaggle-kernel params/11_resnet18.yaml --out kaggle/resnet18 --push",
         check=_bundle("kaggle/resnet18", pushed_version=1)),
    Step("lungs kaggle-kernel params/11_resnet18.yaml --out kaggle/resnet18", check=_bundle("kaggle/resnet18")),
    Step("kaggle kernels push -p kaggle/resnet18", check=_pushed_by_hand),
    Step("kaggle kernels status YOUR_KAGGLE_NAME/lungs-resnet18",
         check=lambda proc, p: None if "has status" in proc.stdout else pytest.fail(proc.stdout)),
    Step("kaggle kernels output YOUR_KAGGLE_NAME/lungs-resnet18 -p kaggle/resnet18-output", check=_fetched),
    Step('lungs submit kaggle/resnet18-output/outputs/resnet18/submission.csv -m "resnet18 on Kaggle"',
         check=_submitted("kaggle/resnet18-output/outputs/resnet18/submission.csv", "resnet18 on Kaggle")),
    Step("lungs kaggle-kernel params/11_resnet18.yaml --out kaggle/resnet18-2gpu --gpus 2",
         check=_bundle("kaggle/resnet18-2gpu", gpus=2)),
    Step("lungs kaggle-kernel params/cpu_cv.yaml --out kaggle/cpu_cv", check=_bundle("kaggle/cpu_cv", per_fold=True)),
    Step("lungs kaggle-kernel params/97_sweep.yaml --out kaggle/sweep", check=_swept_bundle),
    # README / docs/cross-validation.md: cross-validation on a labelled set, compared and combined
    Step("lungs run params/cpu_cv.yaml -p data_dir=QU_DEV/data -p run_name=qu_cv", SHRINK,
         _trained("qu_cv", cv=3, data="qu")),
    Step("lungs run params/cpu_cv.yaml -p data_dir=QU_DEV/data -p run_name=qu_cv -p seed=1 --suffix", SHRINK,
         _trained("qu_cv-2", cv=3, data="qu")),
    Step("lungs run params/cpu_cv_pseudo.yaml -p data_dir=QU_DEV/data -p pseudo_labels=qu_cv -p run_name=qu_cv_pseudo",
         SHRINK, _pseudo_labelled),
    Step("lungs leaderboard", check=_leaderboard),
    Step("lungs score outputs/qu_cv/submission.csv outputs/qu_cv-2/submission.csv --answers QU_DEV/test_answers.csv",
         check=_compared),
    Step("lungs ensemble outputs/qu_cv outputs/qu_cv-2 --out outputs/qu_cv_bag --method mean", check=_ensembled),
    # README / docs/audit.md and docs/predict.md: what the model looks at; films of another source
    Step("lungs audit cpu_small", check=_audited),
    Step("lungs predict cpu_small path/to/films --answers path/to/answers.csv", check=_predicted("cpu_small", audit=False)),
    # docs/masks.md: lung segmentation, a classifier fed its masks, and predicting with it
    Step("lungs run params/05_lung_segmentation.yaml", SHRINK, _segmented),
    Step("lungs run params/cpu_small.yaml -p masks=channel -p mask_run=lung_masks -p run_name=cpu_small_channel",
         SHRINK, _channel),
    Step("lungs predict cpu_small_channel path/to/films --mask-run lung_masks --answers path/to/answers.csv",
         check=_predicted("cpu_small_channel", audit=True)),
    # docs/phantom.md
    Step("lungs phantom data/try", PHANTOM_SIZE, _phantom("data/try", shortcut=False)),
    Step("lungs phantom data/tagged --shortcut", PHANTOM_SIZE, _phantom("data/tagged", shortcut=True)),
]

#: Commands the manual shows that other tests run (or that only CI can: a fresh install), and those tests.
COVERED = {
    "make demo": ("tests/test_notebooks.py::test_demo_runs_the_demo_pipeline_and_reports",
                  "tests/test_project.py::test_make_uses_the_active_environment"),
    "make test": (".ci/run", "tests/test_project.py::test_ci_runs_make_test"),
    "make test-faults": (".ci/run", "tests/test_project.py::test_ci_runs_make_test",
                         "tests/test_faults.py::test_sigterm_stops_at_a_clean_point_with_a_submission_and_a_resume_finishes_the_same"),
    "make test-browser": (".ci/run", "tests/test_project.py::test_ci_runs_make_test",
                          "tests/test_browser.py::test_every_notebook_runs_all_cells_in_jupyterlab"),
    "make lab": ("tests/test_browser.py::test_every_notebook_runs_all_cells_in_jupyterlab",
                 "tests/test_project.py::test_make_uses_the_active_environment"),
    "make tensorboard": ("tests/test_callbacks.py::test_tensorboard_logs_every_epoch_and_a_resume_does_not_fork_the_curves",
                         "tests/test_project.py::test_make_uses_the_active_environment"),
    "make bench": ("tests/test_docs.py::test_what_make_bench_runs_exists",),  # minutes, measured by hand
    "conda env create -f environment.yml && conda activate lungs": (
        "tests/test_project.py::test_environment_yml_matches_pyproject",
        "tests/test_project.py::test_environment_yml_pins_what_make_install_pins",
        "tests/test_project.py::test_make_uses_the_active_environment"),
    "papermill notebooks/10_simple_cnn.ipynb out.ipynb -f params/10_simple_cnn.yaml": (
        "tests/test_notebooks.py::test_plain_papermill_with_a_params_file",),
    "lungs pipeline params/masks -p data_dir=QU_DEV/data --answers QU_DEV/test_answers.csv": (
        "tests/test_runner.py::test_pipeline_scores_every_submission_against_an_answer_key",
        "tests/test_notebooks.py::test_mask_mode_comparison_folder_is_the_cpu_recipes_with_each_mode"),
    "lungs sweep params/cpu_small.yaml --trials 30 --minutes 180 -p data_dir=QU_DEV/data": (
        "tests/test_sweep.py::test_a_killed_sweep_goes_on_where_it_stopped_and_its_trial_resumes_from_its_checkpoint",
        "tests/test_sweep.py::test_a_sweep_in_its_notebook_ranks_its_trials_prunes_a_hopeless_one_and_its_best_recipe_runs"),
    "lungs run params/97_sweep.yaml": (
        "tests/test_sweep.py::test_a_sweep_in_its_notebook_ranks_its_trials_prunes_a_hopeless_one_and_its_best_recipe_runs",
        "tests/test_notebooks.py::test_params_file_is_valid"),
    "python bench/competition.py --dry-run": ("tests/test_bench.py::test_competition_dry_run_reports_every_stage",),
    # Every default trained in full (minutes): its dry run is the test.
    "python bench/notebook_defaults.py": (
        "tests/test_bench.py::test_notebook_defaults_reports_minutes_and_score_against_the_floor",),
}


# ------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------
def test_commands_are_read_from_shell_blocks_only() -> None:
    text = ["lungs run params/x.yaml \\", "  -p seed=1   # another seed", "", "# a comment line",
            'lungs submit s.csv -m "a # b"']
    assert block_commands("bash", text) == ["lungs run params/x.yaml -p seed=1", 'lungs submit s.csv -m "a # b"']
    assert block_commands("console", ["$ lungs leaderboard", "run  val_macro_f1"]) == ["lungs leaderboard"]
    found = documented()
    assert "lungs download" in found and "make demo" in found
    assert not any(c.startswith("error:") for c in found)  # messages live in ```text blocks


def test_every_documented_command_is_run_or_mapped() -> None:
    shown = documented()
    run = [s.command for s in STEPS]
    assert len(run) == len(set(run)) and not set(run) & set(COVERED)
    untested = {c: where for c, where in shown.items() if c not in run and c not in COVERED}
    assert not untested, ("commands the manual shows that no test runs; add a Step (or a COVERED entry naming "
                          "the test that runs it):\n" + "\n".join(f"{c}   ({', '.join(w)})" for c, w in untested.items()))
    stale = [c for c in [*run, *COVERED] if c not in shown]
    assert not stale, f"steps or mappings for commands the manual no longer shows: {stale}"


def test_the_covering_tests_still_exist() -> None:
    for command, refs in COVERED.items():
        for ref in refs:
            path, _, name = ref.partition("::")
            source = (ROOT / path).read_text(encoding="utf-8")
            target = {".ci/run": command + "\n"}.get(path, f"def {name}(")
            assert target in source, f"{command!r} is mapped to {ref}, which is gone"
    makefile = (ROOT / "Makefile").read_text()
    for command in COVERED:
        if command.startswith("make "):
            assert re.search(rf"^{re.escape(command.split()[1])}:", makefile, re.M), command


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS, ids=[f"{i:02d}" for i in range(len(STEPS))])
def test_the_documented_command_works(project: Project, step: Step) -> None:
    proc = project.run(step.command, step.extra)
    said = f"$ {step.command}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    if step.fails:
        assert proc.returncode == 2 and step.fails in proc.stderr, said
        assert proc.stderr.strip().splitlines()[-1].startswith("error: "), said
    else:
        assert proc.returncode == 0, said
    if step.check:
        step.check(proc, project)


def test_what_make_bench_runs_exists() -> None:
    """`make bench` is a measurement of minutes, run by hand (docs/benchmarks.md), not a check; this keeps
    its recipe runnable: every script it calls exists and declares every flag it is given (bench/common.py
    declares the shared ones). bench/competition.py has its own test (tests/test_bench.py)."""
    recipe = re.search(r"^bench:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    calls = re.findall(r"\$\(PY\) (\w+\.py)([^&]*)", recipe)
    assert [script for script, _ in calls] == ["loader.py", "train_step.py", "predict.py", "startup.py"]
    common = (ROOT / "bench" / "common.py").read_text(encoding="utf-8")
    for script, args in calls:
        source = (ROOT / "bench" / script).read_text(encoding="utf-8") + common
        for flag in re.findall(r"--[\w-]+", args):
            assert f'"{flag}"' in source, f"make bench passes {flag} to bench/{script}, which does not declare it"


# ------------------------------------------------------------------------------------------------
# The manual's shape
# ------------------------------------------------------------------------------------------------
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, blanks to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_every_link_of_the_manual_resolves() -> None:
    broken = []
    for path in MANUAL:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_is_a_front_page_with_a_guide_per_task() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 260
    head = readme[: readme.find("\n## ", readme.find("make test"))]
    assert "make demo" in head and "make test" in head
    guides = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md")
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for name in guides:
        assert f"({name})" in index, f"docs/README.md does not list {name}"
    for name in ("real-data.md", "kaggle.md", "predict.md", "cross-validation.md", "audit.md", "design.md"):
        assert f"(docs/{name}" in readme, f"the README does not link docs/{name}"


def test_the_manual_points_the_right_way() -> None:
    """Examples show the defaults the evidence chose, and the keys the code reads."""
    shown = "\n".join(c for c in documented() if "lungs" in c)
    assert not re.search(r"masks[=:] ?(crop|multiply)\b", shown), "examples must not show crop or multiply"
    for path in MANUAL:
        if path.name == "design.md":
            continue  # the design notes name modules on purpose
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\bfolds?\s*[:=]\s*\d", text), f"{path.name}: write cv: k, not folds"
        assert not re.search(r"ensemble_method: (weighted|vote)", text), path.name
        assert not re.search(r"lungs_utils/\w+\.py", text), f"{path.name}: name the code by docs/design.md, not files"
    for command in documented():
        if command.startswith("lungs ensemble"):
            assert " --out " in command and "--method mean" in command, command
