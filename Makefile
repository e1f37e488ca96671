# Fresh-machine setup: `make venv` creates .venv with a CPU torch and pinned libraries.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python

.PHONY: venv browser test demo bench quality clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the local CPU wheel; a bare `torch` requirement would pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# The app's browser tests drive Debian's chromium (no browser download); installed here when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: venv browser
	$(PY) -m pytest -q

demo: venv
	$(PY) examples/quickstart.py

bench: venv
	$(PY) benchmarks/foundation.py

# Toy-world quality benchmark (~2 h on 2 cores incl. the two-subject phase; resumable): benchmarks/results/quality.md.
quality: venv
	$(PIP) install -q -e ".[test,bench]"
	$(PY) benchmarks/quality/run.py --out .bench/quality
	$(PY) benchmarks/quality/report.py --out .bench/quality

clean:
	rm -rf $(VENV) outputs .pytest_cache
