# Two commands on a fresh machine: `make demo` and `make test` (both install into .venv first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# This machine's pip serves these two from local disk; keep in step with pyproject's ranges.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
LAB_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: install demo test test-fast lab bench clean-outputs

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

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lab: install
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) notebooks/

bench: install
	cd bench && ../$(PY) loader.py --n 600 && ../$(PY) train_step.py --n 300 --steps 6 && ../$(PY) predict.py --n 600 && ../$(PY) startup.py

clean-outputs:
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md ! -name .gitkeep -exec rm -rf {} +
