# kvmguest: `make` builds the guests and a local venv; `make demo`, `make test`, `make bench`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

all: guests venv

# Installs the system packages a fresh Debian machine lacks (gcc, make, venv), when root.
deps:
	@./scripts/bootstrap

guests: deps
	$(MAKE) -C guests

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: all
	$(PY) -m pytest $(PYTEST_ARGS)

demo: all
	$(PY) -m kvmguest.demo

bench: all
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench $(BENCH_ARGS)

clean:
	$(MAKE) -C guests clean
	rm -rf $(VENV) *.egg-info

.PHONY: all deps guests venv test demo bench clean
