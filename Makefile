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
bench: native
	@{ command -v wrk && { command -v nginx || test -x /usr/sbin/nginx; }; } >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light; }
	$(BIN)/python bench/run.py

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
	rm -rf $(VENV) $(DEPLOY_VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
