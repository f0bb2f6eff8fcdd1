"""Kaggle notebook bundles: one notebook + its params as a folder that ``kaggle kernels push`` accepts.

A bundle folder holds two files: the notebook (its ``parameters`` cell replaced by the resolved params,
outputs cleared) and ``kernel-metadata.json`` (id ``<user>/<slug>``, title, GPU/internet flags, the
competition attached as a data source).

How the ``lungs_utils`` package gets to Kaggle: it is **embedded in the notebook**. The first code cell
holds a base64 zip of the package's ``*.py`` files, unpacks it into the working directory and puts that
copy first on ``sys.path``. Chosen over the alternative, the package uploaded as a Kaggle dataset and
attached to the notebook, because

- Kaggle notebooks have no internet by default, so ``pip install`` is no option either way;
- an embedded copy needs no extra upload step, no dataset to create, version and keep in sync;
- the code is pinned with the notebook: every pushed version runs exactly the package it was built
  from (the cell prints the archive's sha256), and re-running an old version reproduces it.

The cost is ~130 kB of base64 in one (collapsed) cell. Data needs nothing: ``data_dir`` is baked as
``None``, and discovery finds the competition mount under ``/kaggle/input`` (see :mod:`lungs_utils.paths`).
"""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import unicodedata
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .. import COMPETITION, __version__
from ..errors import DataWarning, LungsError

METADATA_FILE = "kernel-metadata.json"
BOOTSTRAP_TAG = "lungs-bootstrap"
PACKAGE_DIR = "lungs_bundle"  # folder (in the notebook's working directory) the package unpacks into
_PACKAGE = Path(__file__).resolve().parents[1]  # lungs_utils/
#: Params whose values are paths on this machine: meaningless on Kaggle, so they are baked as None.
_LOCAL_PATH_KEYS = ("data_dir", "output_dir", "cache_dir")
_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same source gives the same archive bytes


# ------------------------------------------------------------------------------------------------
# The embedded package
# ------------------------------------------------------------------------------------------------
def package_archive(package_dir: str | os.PathLike[str] = _PACKAGE, extra: Mapping[str, bytes] | None = None
                    ) -> bytes:
    """A deterministic zip of the package's ``*.py`` files (``lungs_utils/...``), no caches, and ``extra``
    files (name → bytes) beside it (a sweep's recipe, search space and notebook)."""
    package_dir = Path(package_dir)
    files = sorted(p for p in package_dir.rglob("*.py")
                   if "__pycache__" not in p.relative_to(package_dir).parts)
    members = [(f"lungs_utils/{p.relative_to(package_dir).as_posix()}", p.read_bytes()) for p in files]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members + sorted((extra or {}).items()):
            info = zipfile.ZipInfo(name, _ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buffer.getvalue()


def bootstrap_source(archive: bytes) -> str:
    """The first code cell: unpack the embedded package, put it first on ``sys.path``, set Kaggle env."""
    digest = hashlib.sha256(archive).hexdigest()[:12]
    encoded = base64.b64encode(archive).decode("ascii")
    return f'''\
# lungs_utils {__version__} (archive sha256 {digest}), embedded by `lungs kaggle-kernel`: Kaggle notebooks
# have no internet, so the package travels inside the notebook. It is unpacked into the working directory
# and put FIRST on sys.path, so this pinned copy wins over any installed one.
import base64, io, os, shutil, sys, zipfile
from pathlib import Path

_lungs_zip = "{encoded}"
_lungs_root = Path.cwd() / "{PACKAGE_DIR}"
shutil.rmtree(_lungs_root / "lungs_utils", ignore_errors=True)  # no stale modules from an older bundle
with zipfile.ZipFile(io.BytesIO(base64.b64decode(_lungs_zip))) as _zf:
    _zf.extractall(_lungs_root)
sys.path.insert(0, str(_lungs_root))
for _name in [m for m in sys.modules if m == "lungs_utils" or m.startswith("lungs_utils.")]:
    del sys.modules[_name]  # re-running this cell must not keep a copy imported from elsewhere
if Path("/kaggle/working").is_dir():
    os.environ.setdefault("LUNGS_OUTPUTS", "/kaggle/working/outputs")  # Kaggle keeps /kaggle/working
if Path("/kaggle/temp").is_dir():
    os.environ.setdefault("LUNGS_CACHE_DIR", "/kaggle/temp/lungs_cache")  # GBs of cache: not an output
os.environ.setdefault("LUNGS_PROGRESS", "plain")  # pushed notebooks run in batch: no widget bars
del _lungs_zip

import lungs_utils
print(f"lungs_utils {{lungs_utils.__version__}} ({digest}) from {{lungs_utils.__file__}}")
'''


# ------------------------------------------------------------------------------------------------
# Params and metadata
# ------------------------------------------------------------------------------------------------
def _literal(key: str, value: Any) -> str:
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, SyntaxError):
        same = False
    if not same:  # e.g. .inf / .nan from YAML: no Python literal reads back as the same value
        raise LungsError(f"params: '{key}' = {value!r} cannot be written into the notebook as a Python "
                         "literal; use a finite number")
    return text


def parameters_source(values: Mapping[str, Any], origin: str) -> str:
    """The baked ``parameters`` cell: every resolved param as a Python assignment."""
    lines = [f"# Parameters baked in by `lungs kaggle-kernel` from {origin}.",
             "# data_dir = None: discovery finds the competition data mounted under /kaggle/input;",
             "# output_dir = None: the run folder is outputs/<run_name> under /kaggle/working."]
    lines += [f"{key} = {_literal(key, value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _slugify(text: str) -> str:
    # The rule Kaggle (python-slugify) uses for the common cases: ASCII, lower case, hyphen-separated.
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower().replace("'", "")).strip("-")


def _names(run_name: str, slug: str | None, title: str | None) -> tuple[str, str]:
    """(slug, title) that agree: Kaggle derives a notebook's URL from its title."""
    def check_slug(value: str) -> str:
        if not (_SLUG.fullmatch(value) and 5 <= len(value) <= 50):
            raise LungsError(f"notebook slug {value!r} must be 5 to 50 lower-case letters, digits and single "
                             "hyphens; pass --slug (e.g. lungs-simple-cnn) or --title")
        return value

    if slug is not None:
        check_slug(slug)
    if title is None:
        title = slug.replace("-", " ") if slug else f"lungs {run_name}"
    title = " ".join(title.split())
    derived = _slugify(title)
    if slug is None:
        slug = derived
    elif slug != derived:
        raise LungsError(f"title {title!r} gives the notebook URL slug {derived!r}, not --slug {slug!r}; "
                         "Kaggle derives the slug from the title, so make them match or pass only one")
    if not 5 <= len(title) <= 50:
        raise LungsError(f"Kaggle notebook titles need 5 to 50 characters, got {title!r}; pass --title")
    return check_slug(slug), title


def _user(user: str | None) -> str:
    from .kaggle import username

    user = user if user is not None else username()
    if not user:
        raise LungsError("no Kaggle user name for the notebook id <user>/<slug>: pass --user NAME, or set "
                         "KAGGLE_USERNAME, or save your API token as ~/.kaggle/kaggle.json")
    user = user.strip()
    if not user or "/" in user or any(c.isspace() for c in user):
        raise LungsError(f"Kaggle user name {user!r} is not valid; pass --user with your Kaggle user name")
    return user


#: The time_limit a bundle bakes in unless told otherwise (minutes): Kaggle's 12-hour session, less 45 minutes
#: for starting the kernel, decoding the data and writing the outputs.
KAGGLE_TIME_LIMIT = 12 * 60 - 45.0
#: Kaggle's machine with two GPUs ("GPU T4 x2" in the editor) as ``kernel-metadata.json`` names it.
TWO_GPU_SHAPE = "NvidiaTeslaT4"
#: The classifier notebooks' training call, which a two-GPU bundle makes launch torchrun.
TRAIN_CALL = "experiment.train(exp)"


def kernel_metadata(*, user: str, slug: str, title: str, code_file: str, gpu: bool, internet: bool,
                    private: bool, gpus: int = 1) -> dict[str, Any]:
    """The ``kernel-metadata.json`` mapping ``kaggle kernels push`` reads (``machine_shape`` asks for the
    two-GPU machine when ``gpus`` is 2)."""
    shape = {"machine_shape": TWO_GPU_SHAPE} if gpus == 2 else {}
    return {**shape,
        "id": f"{user}/{slug}",
        "title": title,
        "code_file": code_file,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": private,
        "enable_gpu": gpu,
        "enable_tpu": False,
        "enable_internet": internet,
        "dataset_sources": [],
        "competition_sources": [COMPETITION],
        "kernel_sources": [],
        "model_sources": [],
    }


# ------------------------------------------------------------------------------------------------
# The bundle
# ------------------------------------------------------------------------------------------------
def _params_file(params_path: str | os.PathLike[str]) -> Path:
    from ..paths import suite_path

    path = Path(params_path).expanduser()
    if not path.exists() and not path.is_absolute():
        path = suite_path(str(params_path))  # `params/x.yaml` works from any directory, as for `lungs run`
    return path


def _bundle_notebook(notebook: Path, values: Mapping[str, Any], origin: str, archive: bytes) -> Any:
    import nbformat

    try:
        nb = nbformat.read(str(notebook), as_version=4)
    except Exception as exc:  # noqa: BLE001 - nbformat raises JSON, validation and OS errors alike
        raise LungsError(f"{notebook} is not a readable notebook ({str(exc).splitlines()[0]})") from None
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise LungsError(f"{notebook} has {len(tagged)} cells tagged 'parameters', needs exactly one; tag "
                         "the cell with the defaults (View > Cell Toolbar > Tags)")
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        if cell.cell_type == "code":
            # A clean notebook: old outputs would be confused with this run's on Kaggle.
            cell.outputs, cell.execution_count = [], None
    tagged[0].source = parameters_source(values, origin)
    if values.get("distributed") and values.get("nproc_per_node", 1) > 1:
        train_cells = [c for c in nb.cells if c.cell_type == "code" and TRAIN_CALL in c.source]
        if not train_cells:
            raise LungsError(f"--gpus {values['nproc_per_node']} needs a classifier notebook (10_ to 15_): "
                             f"{notebook.name} has no `{TRAIN_CALL}` cell to spread over the GPUs")
        n = values["nproc_per_node"]
        train_cells[0].source = (
            f"# {n} GPUs: distributed = True, nproc_per_node = {n}, so this launches\n"
            f"# `torchrun --standalone --nproc_per_node={n} -m lungs_utils train <run folder>/params.yaml`\n"
            "# (one process per GPU, DistributedDataParallel), shows its log, then loads the best weights back.\n"
            + train_cells[0].source)
    boot = nbformat.v4.new_code_cell(bootstrap_source(archive), metadata={
        "tags": [BOOTSTRAP_TAG], "jupyter": {"source_hidden": True}})
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells.insert(first_code, boot)  # after the title markdown, before the parameters cell
    nb.metadata["lungs"] = {"version": __version__, "notebook": notebook.name, "params": origin,
                            "archive_sha256": hashlib.sha256(archive).hexdigest()}
    nbformat.validate(nb)
    return nb


def is_bundle(folder: str | os.PathLike[str]) -> bool:
    """A folder this module wrote: ``kernel-metadata.json`` plus notebooks, nothing else.

    (Jupyter's ``.ipynb_checkpoints/`` is tolerated: opening the bundle in JupyterLab makes one.)
    """
    folder = Path(folder)
    if not (folder / METADATA_FILE).is_file():
        return False
    return all((p.is_file() and (p.name == METADATA_FILE or p.suffix == ".ipynb"))
               or (p.is_dir() and p.name == ".ipynb_checkpoints") for p in folder.iterdir())


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``; an existing ``out`` is swapped out, then removed."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old)  # onto an empty folder: allowed, and atomic
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)  # put the previous bundle back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)


def model_names() -> list[str]:
    """The registered model names, read from the models package's source (its ``@register("name")``
    decorators) instead of importing it: writing a Kaggle bundle must not cost a PyTorch import. A test
    keeps this equal to :func:`lungs_utils.models.names`."""
    names = set()
    for source in (_PACKAGE / "models").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "register"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names.add(node.args[0].value)
    return sorted(names)


def bundle_params(params_path: str | os.PathLike[str], overrides: Iterable[str] | Mapping[str, Any] = (),
                  gpus: int = 1) -> dict[str, Any]:
    """The params a bundle bakes in: the file (found as ``lungs run`` finds it) with the overrides, torchrun
    over both GPUs with ``gpus=2``, and unless given a ``time_limit`` of :data:`KAGGLE_TIME_LIMIT` minutes,
    so that a recipe too long for Kaggle's session still ends with a submission."""
    from .. import params as params_mod

    values = params_mod.load(_params_file(params_path), overrides)
    if gpus > 1:
        values.update(distributed=True, nproc_per_node=gpus)
    if values["time_limit"] is None:
        values["time_limit"] = KAGGLE_TIME_LIMIT
    return values


def kernel_bundle(params_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                  overrides: Iterable[str] | Mapping[str, Any] = (), user: str | None = None,
                  slug: str | None = None, title: str | None = None, gpu: bool = True,
                  internet: bool = False, private: bool = True, gpus: int = 1) -> Path:
    """Write a Kaggle notebook folder for one params file (+ ``key=value`` overrides); returns it.

    ``out_dir`` gets the notebook named by the params (``code_file``) and ``kernel-metadata.json``.
    ``gpus=2`` targets Kaggle's two-GPU machine: the classifier notebook's training cell then runs
    torchrun with one process per GPU (params ``distributed``, ``nproc_per_node``).
    The folder is built in a temporary sibling and renamed into place; an existing non-empty
    ``out_dir`` is refused unless it is a previous bundle (then it is replaced). The user comes from
    ``user``, ``KAGGLE_USERNAME`` or kaggle.json; slug and title default to ``lungs-<run_name>``.
    """
    from ..paths import find_notebook
    from ..runs.sweep import bundle_files, is_sweep

    if gpus not in (1, 2):
        raise LungsError(f"--gpus {gpus}: Kaggle notebooks have one GPU or two (\"GPU T4 x2\"); pass 1 or 2")
    if gpus > 1 and not gpu:
        raise LungsError(f"--gpus {gpus} and --no-gpu contradict each other; drop one")
    path = _params_file(params_path)
    values = bundle_params(params_path, overrides, gpus)
    dropped = [k for k in _LOCAL_PATH_KEYS if values[k] is not None]
    if dropped:
        warnings.warn(f"{', '.join(dropped)} set to null in the Kaggle notebook (paths on this machine mean "
                      "nothing there; the data is found under /kaggle/input)", DataWarning, stacklevel=2)
    values.update({k: None for k in _LOCAL_PATH_KEYS})
    names = model_names()
    if values["model"] not in names:
        raise LungsError(f"params: unknown model {values['model']!r}; valid names: {', '.join(names)}")
    if values["device"] == "cuda" and not gpu:
        raise LungsError("params: device 'cuda' needs a GPU notebook; drop --no-gpu or set -p device=auto")
    extra: dict[str, bytes] = {}
    if is_sweep(values):  # each trial runs the recipe's notebook: the bundle carries it, its params and space
        values, extra = bundle_files(values)
    notebook = find_notebook(values["notebook"])
    user = _user(user)
    slug, title = _names(values["run_name"], slug, title)

    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise LungsError(f"--out {out} is a file; pass a folder for the notebook bundle")
    if out.is_dir() and any(out.iterdir()) and not is_bundle(out):
        raise LungsError(f"--out {out} is not empty and holds more than a previous notebook bundle; "
                         "pass a new or empty folder")

    given = ([f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, Mapping)
             else list(overrides))
    origin = path.name + (f" with {' '.join(given)}" if given else "")
    nb = _bundle_notebook(notebook, values, origin, package_archive(extra=extra))
    meta = kernel_metadata(user=user, slug=slug, title=title, code_file=notebook.name, gpu=gpu,
                           internet=internet, private=private, gpus=gpus)

    import nbformat

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        nbformat.write(nb, str(tmp / notebook.name))
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the bundle is an ordinary folder
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------
# Push
# ------------------------------------------------------------------------------------------------
def _read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LungsError(f"{folder} has no {METADATA_FILE}; make the folder with "
                         "`lungs kaggle-kernel PARAMS.yaml --out DIR`") from None
    except (OSError, ValueError) as exc:
        raise LungsError(f"{path} is not valid JSON ({exc}); rebuild it with `lungs kaggle-kernel`") from None
    code = meta.get("code_file") if isinstance(meta, dict) else None
    if not code or not (folder / code).is_file():
        raise LungsError(f"{path}: code_file {code!r} is not in {folder}; rebuild it with `lungs kaggle-kernel`")
    return meta


def push_kernel(folder: str | os.PathLike[str]) -> str:
    """Upload a bundle folder as a new notebook version (Kaggle then runs it); returns one status line."""
    from .kaggle import network_error, api

    folder = Path(folder).expanduser().resolve()
    meta = _read_metadata(folder)  # local checks first: no credentials needed to find a broken folder
    client = api("push the notebook")
    try:
        result = client.kernels_push(str(folder))
    except ValueError as exc:  # the package validates the metadata locally and raises ValueError
        raise LungsError(f"{folder / METADATA_FILE}: {' '.join(str(exc).split())}; rebuild it with "
                         "`lungs kaggle-kernel`") from None
    except Exception as exc:  # the API raises many types (HTTPError, ApiException, OSError, ...)
        raise network_error(exc, "notebook push") from None
    if result is None:
        raise LungsError("Kaggle notebook push failed without a reply; see the output above and try again")
    if getattr(result, "error", None):
        raise LungsError(f"Kaggle refused the notebook {meta.get('id')}: {' '.join(str(result.error).split())}")
    version = getattr(result, "version_number", None)
    url = getattr(result, "url", None) or f"https://www.kaggle.com/code/{meta.get('id')}"
    line = f"pushed {meta.get('id')}" + (f" version {version}" if version else "") + \
        f"; Kaggle runs it now: {url} (submission.csv appears in its Output tab)"
    unattached = list(getattr(result, "invalid_competition_sources", None) or [])
    if unattached:
        line += f"; NOT attached: {', '.join(unattached)} (join the competition and accept its rules)"
    return line
