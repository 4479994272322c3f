# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
KAPPA := $(VENV)/bin/kappa
DEMO_PORT ?= 9092
DEMO := --broker 127.0.0.1:$(DEMO_PORT) --data-dir .kappa --snapshot-dir snapshots

.PHONY: venv deps demo test bench lint stop clean

$(PY):
	python3 -m venv $(VENV)

venv: $(VENV)/.installed
$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

# System tools the tests drive: Java and Maven for the broker, kcat as the outside client.
deps:
	@missing=""; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn >/dev/null || missing="$$missing maven"; \
	command -v kcat >/dev/null || missing="$$missing kcat"; \
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

test: venv deps
	$(VENV)/bin/ruff check kappa agents tables tests scripts/make_sample.py
	$(VENV)/bin/pytest -q -p no:cacheprovider

# The contenders of issue 6 on 1M rows (override: make bench BENCH_ARGS="--rows 5000000").
bench: venv deps
	scripts/bench $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check kappa agents tables tests scripts/make_sample.py

clean:
	rm -rf $(VENV) .kappa snapshots sample.csv
