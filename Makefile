# Every target works on a fresh clone: each depends on `install`, which builds .venv once
# (re-run when pyproject.toml or constraints.txt change).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# -qq: errors only. -q still let setuptools' "BuildBackendWarning: Editable installation"
# banner (a note about flat layouts, nothing to act on) through on every fresh install.
PIP     := $(BIN)/python -m pip install --disable-pip-version-check -qq -c constraints.txt
WORKERS ?= 2

.PHONY: install demo test test-slow bench lint learn clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt bus/_cache.c
	$(PY) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	@# The C extension is optional: a build that fails must leave no stale library behind.
	rm -f bus/_cache*.so
	$(PIP) -e '.[train,dev,prometheus,sb3,sb3-contrib,web-test]'
	touch $(STAMP)

$(VENV)/.bench-installed: $(STAMP)
	$(PIP) -e '.[train,dev,prometheus,sb3,sb3-contrib,web-test,bench]'
	touch $@

## The main job on the embedded default: daemon + training workers + aggregator + alerting + monitor on loopback.
demo: install
	$(BIN)/trainbus demo --workers $(WORKERS)

## The whole suite (no timing assertions; benchmarks live in `make bench`).
test: install
	$(BIN)/python -m pytest -q -m "not slow" tests

## Long checks: the reference worker learning CartPole to 195 within 150 updates.
test-slow: install
	$(BIN)/python -m pytest -q -m slow tests

bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis bus/_cache*.so
