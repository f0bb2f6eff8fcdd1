"""The fake Kaggle's state: one folder, ``$FAKE_KAGGLE_SERVER``.

    competition/data/...          the competition's data (a phantom set in the competition layout)
    competition/test_answers.csv  its hidden answer key
    submissions.jsonl             one line per accepted submission
    kernels/<user>/<slug>/<n>/    every pushed notebook version (the folder as pushed)

Size of the phantom competition: ``FAKE_KAGGLE_TRAIN`` / ``FAKE_KAGGLE_TEST`` films at ``FAKE_KAGGLE_SIZE``
px (default 36 / 9 at 32 px). Only the competition the suite uses exists here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

COMPETITION = "ml-intensive-yandex-academy-spring-2024"
METADATA_FILE = "kernel-metadata.json"
_SLUG = re.compile(r"^[A-Za-z0-9_.-]+/[a-z0-9-]+$")


class NotFound(Exception):
    """What the real API raises for an unknown competition or notebook (an HTTP 404)."""


def root() -> Path:
    folder = os.environ.get("FAKE_KAGGLE_SERVER")
    if not folder:
        raise RuntimeError("the fake kaggle package needs FAKE_KAGGLE_SERVER (a folder for its state)")
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


def user() -> str | None:
    """The authenticated user: KAGGLE_USERNAME + KAGGLE_KEY, or ~/.kaggle/kaggle.json, as the real client."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return os.environ["KAGGLE_USERNAME"]
    config = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle") / "kaggle.json"
    try:
        return json.loads(config.read_text())["username"]
    except (OSError, ValueError, KeyError):
        return None


def competition_dir(competition: str) -> Path:
    """The competition's folder (data/ and the answer key), made on first use."""
    if competition != COMPETITION:
        raise NotFound(f"404 Client Error: Not Found for url: https://www.kaggle.com/api/v1/competitions/"
                       f"data/download-all/{competition}")
    folder = root() / "competition"
    if not (folder / "data" / "train_answers.csv").is_file():
        from lungs_utils.xrays import phantom  # the suite's own generator: the competition's exact layout

        phantom.generate(folder, n_train=int(os.environ.get("FAKE_KAGGLE_TRAIN", 36)),
                         n_test=int(os.environ.get("FAKE_KAGGLE_TEST", 9)),
                         size=int(os.environ.get("FAKE_KAGGLE_SIZE", 32)), seed=7, workers=1)
    return folder


def write_competition_zip(competition: str, dest: Path) -> Path:
    """``<dest>/<competition>.zip`` holding ``data/...`` as Kaggle's download does (no answer key)."""
    data = competition_dir(competition) / "data"
    archive = dest / f"{competition}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(data.rglob("*")):
            if path.is_file():
                zf.write(path, Path("data") / path.relative_to(data))
    return archive


def test_ids(competition: str) -> list[int]:
    images = competition_dir(competition) / "data" / "test_images"
    return sorted(int(p.stem.split("_", 1)[1]) for p in images.glob("img_*.png"))


def record_submission(file_name: str, message: str, competition: str) -> dict:
    """Accept a submission as Kaggle would (a CSV with id,target_feature, a row per test image)."""
    path = Path(file_name)
    lines = path.read_text().splitlines()
    if not lines or lines[0].strip() != "id,target_feature":
        raise ValueError(f"400 Client Error: Bad Request: {path.name} has no id,target_feature header")
    ids = [int(line.split(",")[0]) for line in lines[1:] if line.strip()]
    if sorted(ids) != test_ids(competition):
        raise ValueError(f"400 Client Error: Bad Request: {path.name} does not cover the test set")
    entry = {"file": str(path.resolve()), "message": message, "competition": competition, "rows": len(ids),
             "user": user()}
    with open(root() / "submissions.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def check_kernel_folder(folder: str) -> dict:
    """The checks the real ``kernels_push`` makes before any request, with its messages (ValueError)."""
    if not os.path.isdir(folder):
        raise ValueError("Invalid folder: " + folder)
    meta_file = Path(folder) / METADATA_FILE
    if not meta_file.is_file():
        raise ValueError("Metadata file not found: " + str(meta_file))
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta.get("title") and len(meta["title"]) < 5:
        raise ValueError("Title must be at least five characters")
    if not meta.get("code_file"):
        raise ValueError("A source file must be specified in the metadata")
    if not (Path(folder) / meta["code_file"]).is_file():
        raise ValueError("Source file not found: " + str(Path(folder) / meta["code_file"]))
    if not meta.get("id"):
        raise ValueError("ID or slug must be specified in the metadata")
    if not _SLUG.match(meta["id"]):
        raise ValueError(f"Invalid kernel id {meta['id']!r}: expected <owner>/<slug>")
    if meta.get("language") not in ("python", "r", "rmarkdown"):
        raise ValueError("A valid language must be specified in the metadata.")
    if meta.get("kernel_type") not in ("script", "notebook"):
        raise ValueError("A valid kernel type must be specified in the metadata.")
    return meta


def push(folder: str) -> dict:
    """Store a new version of the notebook; returns the reply's fields (error, version_number, url, ...)."""
    meta = check_kernel_folder(folder)
    owner, slug = meta["id"].split("/")
    if owner != user():
        return {"error": f"403 Forbidden: {user()} cannot push to {owner}'s notebooks", "version_number": None,
                "url": "", "invalid_competition_sources": []}
    kernel = root() / "kernels" / owner / slug
    version = len(list(kernel.glob("*"))) + 1 if kernel.is_dir() else 1
    shutil.copytree(folder, kernel / str(version))
    unknown = [c for c in meta.get("competition_sources", []) if c != COMPETITION]
    return {"error": None, "version_number": version, "url": f"https://www.kaggle.com/code/{owner}/{slug}",
            "invalid_competition_sources": unknown}


def latest_version(kernel: str) -> Path:
    """The folder of the newest pushed version of ``<owner>/<slug>``."""
    if not _SLUG.match(kernel or ""):
        raise ValueError(f"Invalid kernel string {kernel!r}: expected <owner>/<slug>")
    folder = root() / "kernels" / kernel
    versions = sorted(folder.glob("*"), key=lambda p: int(p.name)) if folder.is_dir() else []
    if not versions:
        raise NotFound(f"404 Client Error: Not Found for url: https://www.kaggle.com/api/v1/kernels/{kernel}")
    return versions[-1]


def run_output(kernel: str, dest: Path) -> list[Path]:
    """What the finished notebook left in /kaggle/working: outputs/<run_name>/submission.csv (one row
    per test image of the competition it attached) and Kaggle's log file."""
    version = latest_version(kernel)
    meta = json.loads((version / METADATA_FILE).read_text())
    notebook = json.loads((version / meta["code_file"]).read_text())
    params = next("".join(c["source"]) for c in notebook["cells"]
                  if "parameters" in c.get("metadata", {}).get("tags", []))
    run_name = re.search(r"^run_name = '([^']+)'$", params, re.M).group(1)
    competition = meta["competition_sources"][0]
    run = dest / "outputs" / run_name
    run.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{i},{i % 3}\n" for i in test_ids(competition))
    (run / "submission.csv").write_text("id,target_feature\n" + rows)
    log = dest / f"{kernel.split('/')[1]}.log"
    log.write_text(json.dumps([{"stream_name": "stdout", "time": 1.0, "data": f"run {run_name} ok\n"}]))
    return [run / "submission.csv", log]
