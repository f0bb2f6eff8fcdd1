# Two commands on a fresh machine: `make demo` and `make test` (both install into .venv first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# This machine's pip serves these two from local disk; keep in step with pyproject's ranges.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
LAB_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: install demo test test-fast test-browser lab tensorboard bench clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) -m lungs_utils demo

test: install
	$(PY) -m pytest -q -ra

# Every notebook, Run All in JupyterLab in headless Chromium (Debian's package: no browser download).
test-browser: install
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		{ echo "error: chromium is missing: install Debian's chromium package (apt-get install chromium)"; exit 2; }
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,browser]'
	LUNGS_BROWSER_TEST=1 $(PY) -m pytest -q -s -ra tests/test_browser.py

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lab: install
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) notebooks/

# Every run's training curves (outputs/<run>/tb/), side by side; open http://localhost:6006
tensorboard: install
	$(VENV)/bin/tensorboard --logdir outputs --port 6006

bench: install
	cd bench && ../$(PY) loader.py --n 600 && ../$(PY) train_step.py --n 300 --steps 6 && ../$(PY) predict.py --n 600 && ../$(PY) startup.py

clean-outputs:
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md ! -name .gitkeep -exec rm -rf {} +
