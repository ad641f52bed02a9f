# aoai-auth-proxy container image:  docker build -t aoai-auth-proxy .
#
# Two stages. The builder turns the source into a wheel, its per-request modules compiled by
# mypyc (hatch_build.py), and installs it, with the runtime dependencies pinned by hash in
# requirements.lock, into the virtual environment /opt/venv. The runtime stage is the same slim
# Python base plus that venv only: no compiler, no build backend, no pip cache, no source tree. It runs as a numeric non-root user, writes nothing at
# run time (works with --read-only and --cap-drop ALL) and handles SIGTERM itself as PID 1.
#
# The base is the official image, pinned by tag. For reproducible builds pin its digest too
# (python:3.11-slim-bookworm@sha256:...) and let a bot such as Renovate update it.

# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

# Debian's C compiler, for mypyc's extensions only (the builder stage; the image has none).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first, so this layer is reused until the lock file changes. Wheels only: a
# dependency built from source would mean an unreviewed toolchain step.
COPY requirements.lock requirements-build.lock ./
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock \
    && python3 -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock \
    && /opt/build/bin/pip install --require-hashes --only-binary=:all: -r requirements-build.lock

# The wheel is built with the pinned hatchling and mypyc from a separate venv (/opt/build), so
# the build tools never land in /opt/venv; --no-deps because every dependency is already in.
# /opt/build holds the runtime dependencies too: mypyc compiles against their types, as the
# tests' `make native` does.
# AOAI_PROXY_REQUIRE_NATIVE: a failed compile fails the build instead of shipping pure Python.
COPY pyproject.toml README.md hatch_build.py ./
COPY src ./src
RUN AOAI_PROXY_REQUIRE_NATIVE=1 /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /dist . \
    && /opt/venv/bin/pip install --no-deps --no-index /dist/*.whl \
    && /opt/venv/bin/python -m pip uninstall --yes pip setuptools \
    # Bytecode is compiled here, with hashes that are never re-checked, because the running
    # container cannot write (read-only root, PYTHONDONTWRITEBYTECODE) and the image never changes.
    && /opt/venv/bin/python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash /opt/venv/lib

# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="aoai-auth-proxy" \
      org.opencontainers.image.description="Authentication sidecar for Azure OpenAI: adds a Microsoft Entra ID token to every request" \
      org.opencontainers.image.licenses="MIT"

COPY --from=builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/aoai-auth-proxy/healthcheck.py

# HOST=0.0.0.0: inside a container the proxy must listen on the container's interface for
# `docker run -p` and other containers to reach it (the program's own default is 127.0.0.1).
# A Kubernetes sidecar sets HOST=127.0.0.1 again: there the app shares the pod's loopback.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080

WORKDIR /app
# Numeric, so Kubernetes' runAsNonRoot can verify it without a passwd entry. Certificate files
# mounted into the container must be readable by this uid or gid (e.g. mode 0640, group 10001).
USER 10001:10001
EXPOSE 8080

# Liveness only (see the script); no curl in slim images, so the standard library does it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "/opt/aoai-auth-proxy/healthcheck.py"]

# Exec form: the proxy is PID 1 and gets SIGTERM directly; it drains (PROXY_SHUTDOWN_DELAY,
# PROXY_SHUTDOWN_TIMEOUT, 25 s by default) and exits 0. Give `docker stop` more than its default
# 10 s (`--stop-timeout 30`, Compose `stop_grace_period`). `demo` and `check` are subcommands.
ENTRYPOINT ["aoai-auth-proxy"]
