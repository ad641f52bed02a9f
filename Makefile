# Every target bootstraps its own environment from the pinned lock file; CI runs the same targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv native pure demo test lint format bench soak check-deploy clean

venv: $(STAMP)

$(STAMP): requirements-dev.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The per-request modules compiled by mypyc, in place (hatch_build.py says which and why; it
# needs gcc and the Python headers), rebuilt whenever a source changes. `make pure`, or NATIVE=0
# with any target, removes them: the same modules then run as Python.
NATIVE ?= 1
NATIVE_STAMP := src/aoai_auth_proxy/.native
SOURCES := $(wildcard src/aoai_auth_proxy/*.py)

ifeq ($(NATIVE),0)
native: pure
else
native: $(NATIVE_STAMP)
endif

$(NATIVE_STAMP): $(STAMP) $(SOURCES) hatch_build.py
	$(BIN)/python hatch_build.py
	touch $@

pure: venv
	$(BIN)/python hatch_build.py --remove
	rm -f $(NATIVE_STAMP)

demo: native
	$(BIN)/aoai-auth-proxy demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint native
	$(BIN)/pytest

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Five minutes of mixed traffic with 90-second tokens; a 20-second version runs in `make test`.
soak: native
	$(BIN)/python -m tests.soak --seconds 300

# wrk generates the load and nginx is the reference relay and the fast upstream (Debian's
# packages); the relay under test and wrk are pinned to different cores. About four minutes.
# The proxy runs as the image runs it: the wheel its build hook compiles, in a venv of Debian's
# CPython 3.11 (check-deploy's image runs that one; it and the official python:3.11-slim are
# PGO+LTO builds, the development venv's pyenv build is neither: issue 8 has the difference).
BENCH_PYTHON ?= /usr/bin/python3.11
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_WHEEL := $(BENCH_VENV)/.wheel

$(BENCH_STAMP): requirements.lock requirements-build.lock
	@{ test -x $(BENCH_PYTHON) && $(BENCH_PYTHON) -c 'import ensurepip, sysconfig, os; \
		assert os.path.exists(sysconfig.get_path("include") + "/Python.h")'; } 2>/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			python3.11 python3.11-venv python3.11-dev gcc; }
	rm -rf $(BENCH_VENV)
	$(BENCH_PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --require-hashes --only-binary=:all: -r requirements.lock
	$(BENCH_VENV)/bin/python -m pip install --quiet --require-hashes --only-binary=:all: -r requirements-build.lock
	touch $@

$(BENCH_WHEEL): $(BENCH_STAMP) pyproject.toml README.md hatch_build.py $(SOURCES) $(wildcard src/aoai_auth_proxy/*/*.py)
	rm -rf $(BENCH_VENV)/dist
	AOAI_PROXY_REQUIRE_NATIVE=1 $(BENCH_VENV)/bin/python -m pip wheel --quiet --no-deps \
		--no-build-isolation --wheel-dir $(BENCH_VENV)/dist .
	$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps --no-index --force-reinstall \
		$(BENCH_VENV)/dist/*.whl
	touch $@

bench: native $(BENCH_WHEEL)
	@{ command -v wrk && { command -v nginx || test -x /usr/sbin/nginx; }; } >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light; }
	$(BIN)/python bench/run.py --proxy-python $(BENCH_VENV)/bin/python

# The container image, Compose files and Kubernetes manifests, proven with podman on this machine
# (deploy/ci/check-deploy.sh says how). Needs root and apt; its tools live in their own venv.
DEPLOY_VENV := .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed

$(DEPLOY_STAMP): deploy/ci/requirements.lock
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install --quiet --require-hashes -r deploy/ci/requirements.lock
	touch $@

check-deploy: native $(DEPLOY_STAMP)
	bash deploy/ci/check-deploy.sh

clean:
	rm -f src/*.so src/aoai_auth_proxy/*.so $(NATIVE_STAMP)
	rm -rf $(VENV) $(DEPLOY_VENV) $(BENCH_VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
