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

# QEMU >= 9 too (when root): tests boot the guests under it and read the files it saves.
test: all
	-@./scripts/setup-qemu
	$(PY) -m pytest $(PYTEST_ARGS)

demo: all
	$(PY) -m kvmguest.front.demo

# Long modes, not part of `make test`.
soak: all
	KVMGUEST_SOAK_ROUNDS=$${ROUNDS:-100} $(PY) -m pytest -q -s tests/test_soak.py tests/test_hostile_guest.py
	KVMGUEST_CKPT_KILLS=$${KILLS:-2000} KVMGUEST_CKPT_SEEDS=1,2,3,4,5,6,7,8 \
		$(PY) -m pytest -q tests/test_checkpoint.py

# The Linux tests on Debian's stock kernel: booted to its initrd's /init once (~15 minutes
# on a host that emulates it), then restored from mid-boot (`make test` runs the boot
# tests on the minimal kernel for test guests, scripts/build-linux).
linux: all
	KVMGUEST_LINUX_BOOT=debian $(PY) -m pytest -q tests/test_linux.py tests/test_linux_boot.py

fuzz: all
	KVMGUEST_FUZZ_EXAMPLES=$${EXAMPLES:-20000} $(PY) -m pytest -q tests/test_fuzz.py

# kvm-unit-tests' x86 suite on kvmguest: the pinned copy in third_party/, built
# outside the tree (scripts/build-kut), then every test and our migration-protocol test.
# KUT_ARGS adds options, e.g. KUT_ARGS=--compare-qemu or KUT_ARGS="smptest realmode".
KUT_ARGS ?=
kut: all
	@dir=$$(./scripts/build-kut) && \
	$(PY) -m kvmguest kut "$$dir" --jobs 2 $(KUT_ARGS); a=$$?; \
	$(PY) -m kvmguest kut "$$dir" --cfg guests/kut/unittests.cfg; b=$$?; \
	exit $$(( a || b ))

# `make bench` (full, ~20 min) or `make bench BENCH_ARGS=--quick` (under 2 min).
# scripts/setup-qemu installs QEMU >= 9 (mapped-ram) for the side by side, when root.
bench: all
	$(PY) -m pip install -q -e '.[bench]'
	-./scripts/setup-qemu
	$(PY) -m bench $(BENCH_ARGS)

clean:
	$(MAKE) -C guests clean
	rm -rf $(VENV) *.egg-info

.PHONY: all deps guests venv test demo bench soak fuzz kut linux clean
