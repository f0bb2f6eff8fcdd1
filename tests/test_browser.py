"""Every notebook run in a real browser, as a person runs it: JupyterLab in headless Chromium, *Run All*.

`make test-browser` installs what it needs (Debian's `chromium`, `playwright` from PyPI: no browser is
downloaded) and runs this file with ``LUNGS_BROWSER_TEST=1``; `make test` skips it. The notebooks are
copied into a scratch folder first (JupyterLab saves outputs into them) and run in the order a person
would, on a small phantom set (``LUNGS_DATA_DIR``), each with a toy-size cell after its parameters cell
(``TOY``: what a person does to try a notebook quickly, and what papermill's injected cell does); every run
folder goes to a scratch ``outputs/``. A screenshot per notebook, and one of the HTML report at 1280 px,
go to the folder printed at the start (``LUNGS_BROWSER_SHOTS``, default ``outputs/browser``).

What this checks is JupyterLab's side: every cell runs without an error, widgets render, the console
stays clean, the report fits a window. Whether each model notebook's own defaults learn on the demo's
data is a measurement of minutes and macro-F1, not of the browser: ``bench/notebook_defaults.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("00_data", "05_lung_segmentation", "10_simple_cnn", "11_resnet", "12_unet", "13_mobilenet", "14_vgg",
         "15_modern", "90_ensemble", "95_leaderboard", "96_explore", "97_sweep")
TRAINING = "10_simple_cnn"  # where a progress widget must render
MODELS = ("10_simple_cnn", "11_resnet", "12_unet", "13_mobilenet", "14_vgg", "15_modern")
#: The toy-size cell put after a notebook's parameters cell: a few epochs at 32 px on the small phantom
#: set, so the test measures JupyterLab, not training (CI machines without bf16 are 5-10x slower).
TOY = {**{name: {"image_size": 32, "epochs": 2, "batch_size": 16} for name in MODELS},
       "05_lung_segmentation": {"image_size": 32, "epochs": 2, "batch_size": 16, "cv": 2},
       "97_sweep": {"trials": 2}}
#: The small phantom set every notebook finds through LUNGS_DATA_DIR (``lungs phantom`` arguments).
PHANTOM = ("--train", "90", "--test", "15", "--size", "64")
#: What every model notebook's run folder holds after Run All (the contract in docs/design.md; run.json is
#: the runner's, written by `lungs run` and papermill runs, not by JupyterLab).
RUN_FOLDER = ("params.yaml", "history.csv", "metrics.json", "val_predictions.csv", "test_predictions.csv",
              "submission.csv", "split.csv", "checkpoints/best.pt", "checkpoints/last.pt", "audit.csv",
              "plots/learning_curves.png", "plots/confusion_matrix.png", "plots/gradcam.png")
#: A hung notebook, not a slow one.
NOTEBOOK_TIMEOUT_S = 900
#: Console messages of the page that are not JupyterLab failing (a missing favicon, the browser's own notes).
BENIGN = ("favicon", "Failed to load resource: the server responded with a status of 404")

pytestmark = pytest.mark.skipif(os.environ.get("LUNGS_BROWSER_TEST") != "1",
                                reason="real-browser test: run `make test-browser`")


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no chromium on PATH: `make test-browser` installs Debian's chromium (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    """A JupyterLab server on a free loopback port, over a scratch copy of notebooks/."""
    work = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", work / "notebooks")
    for name, values in TOY.items():
        _add_toy_cell(work / "notebooks" / f"{name}.ipynb", values)
    subprocess.run([sys.executable, "-m", "lungs_utils", "phantom", str(work / "phantom"), *PHANTOM], check=True,
                   capture_output=True)
    outputs = work / "outputs"
    shots = Path(os.environ.get("LUNGS_BROWSER_SHOTS", ROOT / "outputs" / "browser"))
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    print(f"\nscreenshots: {shots}", flush=True)
    port, token = free_port(), "lungs-browser-test"
    env = {**os.environ, "LUNGS_OUTPUTS": str(outputs), "LUNGS_HOME": str(ROOT),
           "LUNGS_DATA_DIR": str(work / "phantom" / "data"), "JUPYTER_CONFIG_DIR": str(work / "cfg"),
           "JUPYTER_RUNTIME_DIR": str(work / "rt")}
    env.pop("LUNGS_PROGRESS", None)  # JupyterLab shows widget bars
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={work / 'notebooks'}",
           "--LabApp.expose_app_in_browser=True", "--ServerApp.disable_check_xsrf=False"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    # No "get notified about Jupyter news?" toast over the screenshots (and no request for news).
    news = work / "cfg" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    log = open(work / "lab.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"jupyter lab did not start: {(work / 'lab.log').read_text()[-2000:]}")
    try:
        yield {"url": url, "token": token, "work": work, "outputs": outputs, "shots": shots, "env": env}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _wait(page, script: str, arg: str, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if page.evaluate(script, arg):
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# The notebook's panel, found by its path (not "the current widget": a restored tab may be current).
_PANEL = """(path) => { const app = window.jupyterapp; if (!app) return null;
  for (const w of app.shell.widgets('main')) { if (w.context && w.context.path === path && w.content) return w; }
  return null; }"""
_READY = f"""(path) => {{ const w = ({_PANEL})(path);
  const k = w && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle'; }}"""
_RUN_ALL = f"""(path) => {{ const w = ({_PANEL})(path); window.jupyterapp.shell.activateById(w.id);
  return window.jupyterapp.commands.execute('notebook:run-all-cells').then(() => true); }}"""
# Done: the kernel idle and every code cell run, or one failed (Run All stops there: no waiting it out).
_ALL_DONE = f"""(path) => {{ const w = ({_PANEL})(path);
  const cells = w.content.widgets.filter(c => c.model.type === 'code');
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  const failed = cells.some(c => {{ const o = c.model.outputs;
    for (let i = 0; i < o.length; i++) {{ if (o.get(i).type === 'error') return true; }} return false; }});
  return !!k && k.status === 'idle' && (failed || cells.every(c => c.model.executionCount !== null
         && !c.node.classList.contains('jp-mod-pending'))); }}"""
_SAVE_AND_CLOSE = f"""async (path) => {{ const w = ({_PANEL})(path);
  await w.context.save(); await w.sessionContext.shutdown(); w.dispose(); return true; }}"""


def test_every_notebook_runs_all_cells_in_jupyterlab(lab: dict) -> None:
    from playwright.sync_api import sync_playwright

    timings: dict[str, float] = {}
    scores: dict[str, float] = {}
    console: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        only = [n for n in os.environ.get("LUNGS_BROWSER_ONLY", "").split(",") if n]  # for debugging one
        for name in [n for n in ORDER if not only or n in only]:
            start = time.monotonic()
            path = f"{name}.ipynb"
            # `reset`: a fresh workspace each time, so no earlier tab is restored beside this one.
            page.goto(f"{lab['url']}/lab/tree/{path}?reset&token={lab['token']}")
            _wait(page, _READY, path, 120, f"{name}: the notebook and an idle kernel")
            page.evaluate(_RUN_ALL, path)  # the Run menu's "Run All Cells"
            time.sleep(2)
            _wait(page, _ALL_DONE, path, NOTEBOOK_TIMEOUT_S, f"{name}: Run All to finish")
            if name == TRAINING:
                widgets = page.locator(".jp-OutputArea .widget-progress, .jp-OutputArea .jupyter-widgets .progress")
                assert widgets.count() > 0, f"{name}: no progress widget rendered"
            timings[name] = time.monotonic() - start
            page.screenshot(path=str(lab["shots"] / f"{name}.png"))
            views = page.locator(".jp-OutputArea .jupyter-widgets").count()  # closing the notebook removes them
            page.evaluate(_SAVE_AND_CLOSE, path)
            saved = nbformat.read(lab["work"] / "notebooks" / f"{name}.ipynb", as_version=4)
            code = [c for c in saved.cells if c.cell_type == "code"]
            errors = [o for c in code for o in c.outputs if o.output_type == "error"]
            assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
            assert all(c.execution_count is not None for c in code), f"{name}: a code cell was left unexecuted"
            score = ""
            if name in MODELS:  # the run the notebook made, at the toy size it was given
                run_name = _default(saved, "run_name")
                metrics = json.loads((lab["outputs"] / run_name / "metrics.json").read_text())
                given = yaml.safe_load((lab["outputs"] / run_name / "params.yaml").read_text())
                assert (given["image_size"], metrics["epochs_run"]) == (32, 2), (name, given, metrics)
                missing = [f for f in RUN_FOLDER if not (lab["outputs"] / run_name / f).is_file()]
                assert not missing, f"{name}: its run folder lacks {missing}"
                scores[name] = metrics["val_macro_f1"]
                score = f", validation macro-F1 {scores[name]:.3f} (toy size)"
            if name == "96_explore":
                text = json.dumps(saved.cells[-3:] + saved.cells[:6])
                assert "teaching tool, not a diagnosis" in text and "the model says" in text, name
                assert views > 0, f"{name}: no widget rendered"
            print(f"{name}: Run All {timings[name]:.0f} s{score}", flush=True)
        # The HTML report, as a person opens it, in a 1280 px window: the leaderboard must fit (or scroll
        # inside its own box), never push the page sideways.
        subprocess.run([sys.executable, "-m", "lungs_utils", "report"], env=lab["env"], check=True,
                       capture_output=True)
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto((lab["outputs"] / "report" / "index.html").as_uri())
        page.screenshot(path=str(lab["shots"] / "report.png"), full_page=True)
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the report is {overflow} px wider than a 1280 px window"
        browser.close()
    (lab["shots"] / "timings.json").write_text(json.dumps({"seconds": timings, "val_macro_f1": scores}, indent=2))
    problems = [m for m in console if not any(b in m for b in BENIGN)]
    assert not problems, "browser console errors:\n" + "\n".join(problems[:10])


def _default(nb: nbformat.NotebookNode, key: str) -> object:
    """A value of a notebook's parameters cell."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    namespace: dict = {}
    exec(cell.source, namespace)  # noqa: S102 - the suite's own notebook: plain assignments
    return namespace[key]


def _add_toy_cell(path: Path, values: dict[str, object]) -> None:
    """Put a cell setting ``values`` right after the notebook's parameters cell (tagged as papermill tags
    the cell it injects), so Run All uses them; the notebook's own defaults stay visible above it."""
    nb = nbformat.read(str(path), as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Toy size for the browser test\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(at + 1, cell)
    nbformat.write(nb, str(path))
