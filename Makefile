# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
KAPPA := $(VENV)/bin/kappa
DEMO_PORT ?= 9092
DEMO := --broker 127.0.0.1:$(DEMO_PORT) --data-dir .kappa --snapshot-dir snapshots
LINT_PATHS := kappa agents tables tests scripts/make_sample.py scripts/drill_pauses.py
# Every runtime, dev/test and bench package, exact versions with hashes, for CPython 3.11 on Linux x86_64.
LOCK := requirements.lock
LOCK_ARGS ?=
UV_COMPILE := $(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra bench --generate-hashes \
	--python-version 3.11 --python-platform x86_64-unknown-linux-gnu --quiet --custom-compile-command "make lock"

.PHONY: venv deps demo test test-fast bench lint typecheck format lock stop clean clean-bench

$(PY):
	python3 -m venv $(VENV)

# Installs exactly the lock (and kappa itself, editable, without resolving anything), again whenever the lock
# changes; packages that left the lock are uninstalled.
venv: $(VENV)/.installed
$(VENV)/.installed: $(PY) $(LOCK) pyproject.toml
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m compileall -q kappa agents tables  # an editable install is not compiled, and PYTHONDONTWRITEBYTECODE may be set
	@stale=$$(comm -23 <($(PY) -m pip freeze --exclude-editable | sed 's/[ =@].*//' | tr 'A-Z_.' 'a-z--' | sort) \
	                   <(sed -n 's/^\([A-Za-z0-9][A-Za-z0-9._-]*\)==.*/\1/p' $(LOCK) | tr 'A-Z_.' 'a-z--' | sort)); \
	if [ -n "$$stale" ]; then echo "uninstalling (not in $(LOCK)):" $$stale; $(PY) -m pip uninstall --quiet -y $$stale; fi
	touch $@

# Re-resolves the lock from pyproject.toml, keeping every version already locked unless pyproject.toml excludes it.
# To upgrade: make lock LOCK_ARGS="--upgrade-package pandas" (or LOCK_ARGS=--upgrade for everything).
lock: venv
	cp $(LOCK) $(LOCK).tmp
	$(UV_COMPILE) $(LOCK_ARGS) -o $(LOCK).tmp
	@if cmp -s $(LOCK).tmp $(LOCK); then rm $(LOCK).tmp; echo "$(LOCK) unchanged"; else mv $(LOCK).tmp $(LOCK); echo "$(LOCK) updated: make venv installs it; run make test"; fi

# System tools the tests drive: Java and Maven for the broker (a JDK: the bench compiles its Kafka Streams
# contender), kcat as the outside client, ss and pgrep (iproute2, procps) that some tests use.
deps:
	@missing=""; \
	command -v javac >/dev/null || missing="$$missing openjdk-17-jdk-headless"; \
	command -v mvn >/dev/null || missing="$$missing maven"; \
	command -v kcat >/dev/null || missing="$$missing kcat"; \
	command -v ss >/dev/null || missing="$$missing iproute2"; \
	command -v pgrep >/dev/null || missing="$$missing procps"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q $$missing >/dev/null 2>&1 || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q $$missing >/dev/null; } \
	    || { echo "could not install$$missing with apt-get; install them and retry" >&2; exit 1; }; \
	fi

demo: venv deps
	$(PY) scripts/make_sample.py --rows 200000 --keys 1000 --out sample.csv
	$(KAPPA) kafka start --port $(DEMO_PORT) $(DEMO)
	$(KAPPA) load sample.csv --key city --topic sample $(DEMO)
	scripts/replay --topic sample --value amount --key city --batch $(DEMO)
	$(KAPPA) snapshot --pipeline sample $(DEMO)
	@echo "the broker is still running: stop it with 'make stop'"

stop: venv
	$(KAPPA) kafka stop --data-dir .kappa

# The suite runs on TEST_WORKERS pytest-xdist workers, each with its own broker, a test file on one
# worker (--dist loadfile), so the 3-node cluster's tests (tests/test_cluster.py) share one cluster.
# Most of a test is waiting on a broker or a process: two workers on this 2-core machine took 13 min
# where one took 22.
TEST_WORKERS ?= 2
PYTEST := $(VENV)/bin/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

test: venv deps lint
	$(PYTEST) --durations=15

# The quick loop: everything but the slow fault, security and bench tests (CI runs `make test`, all of them).
test-fast: venv deps
	$(PYTEST) -m "not slow"

# The bench: every contender on 1M rows at 1k and 1M keys (3 interleaved rounds, medians), kappa's
# scale-out under a CPU quota per process, bench.json and bench.png. The external peers' venvs and Kafka
# Streams build are kept in BENCH_PEERS between runs (override: make bench BENCH_ARGS="--rows 5000000").
BENCH_PEERS ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kappa/bench-peers
bench: venv deps
	scripts/bench --peers-dir $(BENCH_PEERS) --plot bench.png $(BENCH_ARGS)

# ruff (SLF included: private members of Faust, aiokafka and mode only in kappa/engine/faust_internals.py),
# then mypy on kappa, agents and tables (pyproject.toml [tool.mypy])
lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

typecheck: venv
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff check --select I --fix --quiet $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

# The demo's broker is stopped first: removing its data dir under it would leave a JVM no command can stop.
# Brokers kappa started from other data dirs are named, with the command that stops each without the venv.
clean:
	if [ -x $(KAPPA) ] && [ -d .kappa ]; then $(KAPPA) kafka stop --data-dir .kappa; fi
	rm -rf $(VENV) .kappa snapshots sample.csv *.egg-info .ruff_cache .mypy_cache
	find kappa agents tables tests scripts -name __pycache__ -type d -prune -exec rm -rf {} +
	@pgrep -f 'kafka\.Kafka .*/kafka/(node-[0-9]+/)?server\.properties' | while read -r pid; do \
	  dir=$$(tr '\0' '\n' < /proc/$$pid/cmdline | tail -1); \
	  echo "note: a Kafka broker kappa started still runs from $${dir%/kafka/*} (pid $$pid): kill $$pid stops it cleanly"; \
	done; true

# The bench's peer venvs and Kafka Streams build (about 2 GB) and its outputs.
clean-bench:
	rm -rf $(BENCH_PEERS) bench.json bench.png
