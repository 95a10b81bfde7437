# syntax=docker/dockerfile:1.7
#
# datagrid-forwarder image.
#
#   docker build -t datagrid-forwarder:dev \
#     --build-arg VERSION=0.4.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Behind a TLS-intercepting proxy, hand the build your system's CA bundle as a secret (it replaces
# the image's bundle for the dependency download only, and stays out of every layer):
#   --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt
# The same file builds with Docker (BuildKit) and with podman/buildah (deploy/k8s/image.sh).
#
# Two stages: `build` installs the dependencies pinned in uv.lock (--locked: the build fails if
# the lock is stale) into a virtual environment, then the project itself as a wheel; `runtime`
# receives only that venv. It runs as a numeric non-root user and writes nothing outside /tmp,
# so it works with a read-only root filesystem (the Helm chart mounts an emptyDir at /tmp).

# Both stages must use the same interpreter: the venv's python is a symlink to it.
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie
# The uv that wrote uv.lock (keep it equal to the developers' uv).
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
# A C compiler for the wheel's compiled hot path (mypyc, hatch_build.py): the python image has
# Python's headers but no gcc. Build stage only: the runtime stage receives the venv alone.
# Not pinned: the same file builds on the python image's Debian and on the e2e stand-in's.
# hadolint ignore=DL3008
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# Compile bytecode now: the runtime filesystem is read-only and PYTHONDONTWRITEBYTECODE is set,
# so this is the only chance to have .pyc files (faster start-up). Copy, do not hard-link, from
# the cache mount; use the image's interpreter, never a downloaded one.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/opt/forwarder/venv \
    UV_SYSTEM_CERTS=1
WORKDIR /src
# Dependencies first, from the lock file alone: this layer is reused until uv.lock changes.
# Bind targets are absolute: buildah refuses relative ones (Docker accepts both).
# UV_SYSTEM_CERTS: trust the image's CA store, which the optional `ca-bundle` secret replaces.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca-bundle,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=bind,source=uv.lock,target=/src/uv.lock \
    --mount=type=bind,source=pyproject.toml,target=/src/pyproject.toml \
    uv sync --locked --no-dev --no-install-project
COPY pyproject.toml uv.lock README.md hatch_build.py ./
COPY forwarder ./forwarder
# The project itself, as a regular (non-editable) install: the venv then stands alone, with
# forwarder.hotpath compiled (the build hook fails rather than leave it out). The build backend,
# mypy and setuptools (pinned in pyproject.toml's [build-system]) are downloaded here: same CA
# secret.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca-bundle,target=/etc/ssl/certs/ca-certificates.crt \
    uv sync --locked --no-dev --no-editable
# Prove it: the module Python imports is the extension module, not the source beside it (-P:
# not /src/forwarder, the source tree in the working directory).
RUN /opt/forwarder/venv/bin/python -P -c \
    'import forwarder.hotpath as m, sys; print(m.__file__); sys.exit(m.__file__.endswith(".py"))'

FROM ${PYTHON_IMAGE} AS runtime
ARG PYTHON_IMAGE
ARG VERSION=0.4.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="datagrid-forwarder" \
      org.opencontainers.image.description="Forwards Datagrid batch-prediction results into Kafka, once per batch." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 forwarder \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin forwarder
COPY --from=build --chown=0:0 /opt/forwarder/venv /opt/forwarder/venv
# PYTHONDONTWRITEBYTECODE: never try to write .pyc files on a read-only root filesystem.
# PYTHONUNBUFFERED: log lines leave the process as they are written.
# HOME and TMPDIR point at /tmp, the one writable place (an emptyDir in the chart).
ENV PATH="/opt/forwarder/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    HOME=/tmp \
    TMPDIR=/tmp
# An empty, root-owned working directory: settings also read ./.env, and there must be none.
WORKDIR /opt/forwarder
USER 10001:10001
EXPOSE 8080
# For `docker run` and compose; Kubernetes ignores it and uses the chart's probes.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('FORWARDER_HTTP_PORT', '8080') + '/healthz', timeout=2)"]
# Exec form: python is PID 1 and receives SIGTERM itself; `forwarder serve` drains on SIGTERM
# (bounded by FORWARDER_DRAIN_TIMEOUT_SECONDS) and starts no child processes to reap.
ENTRYPOINT ["forwarder"]
CMD ["serve"]
