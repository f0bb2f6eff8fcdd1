# Two commands on a fresh machine: `make demo` and `make test`. They use the Python environment that is
# active (a virtual env: $VIRTUAL_ENV; a conda env other than base: $CONDA_PREFIX, e.g. after
# `conda env create -f environment.yml && conda activate lungs`) and install into it; with none active,
# they create and use .venv here.
PYTHON ?= python3
ACTIVE_ENV := $(or $(VIRTUAL_ENV),$(if $(filter base,$(CONDA_DEFAULT_ENV)),,$(CONDA_PREFIX)))
VENV   ?= $(or $(ACTIVE_ENV),.venv)
PY     := $(abspath $(VENV)/bin/python)
STAMP  := $(VENV)/.installed-stamp
# This machine's pip serves these two from local disk; keep in step with pyproject's ranges and with
# environment.yml (tests/test_project.py compares them).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
LAB_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: install demo test test-fast test-faults test-browser lab tensorboard bench clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml
	$(if $(ACTIVE_ENV),test -x $(PY) || { echo "error: the active environment $(ACTIVE_ENV) has no bin/python"; exit 2; },test -x $(PY) || $(PYTHON) -m venv $(VENV))
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) -m lungs_utils demo

test: install
	$(PY) -m pytest -q -ra -m "not faults"

# Real runs broken on purpose: SIGKILL at random points, signals, full and read-only disks (tmpfs mounts:
# root only, skipped with the reason elsewhere), damaged files, locks (tests/test_faults.py).
test-faults: install
	$(PY) -m pytest -q -ra -m faults tests/test_faults.py

# Every notebook, Run All in JupyterLab in headless Chromium (Debian's package: no browser download).
test-browser: install
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		{ echo "error: chromium is missing: install Debian's chromium package (apt-get install chromium)"; exit 2; }
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,browser]'
	LUNGS_BROWSER_TEST=1 $(PY) -m pytest -q -s -ra tests/test_browser.py

test-fast: install
	$(PY) -m pytest -q -m "not slow and not faults"

lab: install
	$(abspath $(VENV))/bin/jupyter lab $(LAB_FLAGS) notebooks/

# Every run's training curves (outputs/<run>/tb/), side by side; open http://localhost:6006
tensorboard: install
	$(abspath $(VENV))/bin/tensorboard --logdir outputs --port 6006

bench: install
	cd bench && $(PY) loader.py --n 600 && $(PY) train_step.py --n 300 --steps 6 && $(PY) predict.py --n 600 && $(PY) startup.py

clean-outputs:
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md ! -name .gitkeep -exec rm -rf {} +
