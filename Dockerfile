# sse-gateway container image.
#
#   docker build -t sse-gateway .
#   docker run --rm -p 8080:8080 -p 9464:9464 --stop-timeout 30 sse-gateway
#       -> the embedded demo: http://127.0.0.1:8080/, metrics on :9464/metrics
#
# A real deployment mounts its configuration file (no VOLUME: nothing is written
# at run time, the image runs read-only):
#
#   docker run --rm -p 8080:8080 -p 9464:9464 --stop-timeout 30 --read-only \
#       -v ./gateway.toml:/etc/sse-gateway/gateway.toml:ro \
#       -e SSE_GATEWAY_CONFIG=/etc/sse-gateway/gateway.toml sse-gateway
#
# Any setting can also be given as SSE_GATEWAY_<SECTION>_<KEY>. The environment
# beats the file, so the listen addresses below win over [server] listen and
# [metrics] listen in a mounted file: change ports with -e, not in the file.
#
# Both stages use the same base image: the venv's bin/python is a symlink to
# the base interpreter, so the venv is only valid on the image that built it.
# Pin a digest too (python:3.12-slim-bookworm@sha256:...) for reproducible builds.

FROM python:3.12-slim-bookworm AS builder

# Every RUN below refers to the venv as $VIRTUAL_ENV and to files relative to
# WORKDIR: tests/test_dockerfile.py replays these steps in a temporary venv.
ENV VIRTUAL_ENV=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1
ENV PATH="$VIRTUAL_ENV/bin:$PATH"
WORKDIR /src

# Dependencies in their own layer, rebuilt only when pyproject.toml or the lock
# changes (not on every code or README edit): read [project] dependencies with the
# stdlib tomllib and install exactly that list, at the versions constraints.txt
# pins (the lock `make` installs with too, so the image runs what CI tested).
# Building the project itself here would need gateway/ (setuptools refuses a
# missing package directory), and a hand-kept requirements file would drift from
# pyproject.toml.
COPY pyproject.toml constraints.txt ./
RUN python -m venv "$VIRTUAL_ENV" \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r requirements.txt

# The project itself, without dependencies (already installed above). setuptools
# reads README.md as the package's long description, so it comes along.
COPY README.md ./
COPY gateway/ gateway/
RUN pip install --no-cache-dir --no-deps . \
    && sse-gateway --check > /dev/null


FROM python:3.12-slim-bookworm

LABEL org.opencontainers.image.title="sse-gateway" \
      org.opencontainers.image.description="A reverse-proxy gateway for Server-Sent Events: one upstream subscription per topic, fanned out to every subscriber." \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed, numeric, unprivileged user: Kubernetes' runAsNonRoot can verify a
# numeric USER, and volume permissions can be granted to 10001 ahead of time.
RUN groupadd --system --gid 10001 sse-gateway \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin sse-gateway

# The venv stays owned by root: the gateway cannot modify its own code.
COPY --from=builder /opt/venv /opt/venv

ENV VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SSE_GATEWAY_SERVER_LISTEN=0.0.0.0:8080 \
    SSE_GATEWAY_METRICS_LISTEN=0.0.0.0:9464
ENV PATH="$VIRTUAL_ENV/bin:$PATH"

USER 10001:10001

# 8080: the gateway (SSE routes, /healthz, /readyz). 9464: Prometheus /metrics.
EXPOSE 8080 9464

# /healthz is liveness (it stays 200 while draining; /readyz turns 503 at once).
# No curl in slim images: the stdlib does it. The port follows
# SSE_GATEWAY_SERVER_LISTEN; an HTTP error or a refused connection exits 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('SSE_GATEWAY_SERVER_LISTEN', ':8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=3)"]

# On SIGTERM the gateway drains: streams end in waves over drain_seconds (5 s),
# then whatever is left gets shutdown_timeout_seconds (10 s), so it can need
# 15 s before it exits 0. Give it more than that before SIGKILL, or clients see
# a reset instead of a clean end: `docker run/stop --stop-timeout/--time 30`
# (Docker's default is 10 s!), compose `stop_grace_period: 30s`, Kubernetes
# `terminationGracePeriodSeconds: 30` (the default, 30 s, is enough unless the
# drain settings are raised).
STOPSIGNAL SIGTERM

# Exec form: sse-gateway is PID 1 and receives SIGTERM itself (no shell between).
# Arguments after the image name are sse-gateway flags, e.g. `--check`.
ENTRYPOINT ["sse-gateway"]
CMD []
