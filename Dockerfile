# syntax=docker/dockerfile:1
#
# wsbroker node image.
#
#   docker build -t wsbroker .
#   docker run --rm -p 8765:8765 -e WSB_JWT_SECRET=... -e WSB_REDIS_URL=redis://redis:6379/0 wsbroker
#
# Configure it with WSB_* variables (every `wsbroker serve` flag has one:
# --redis-url <-> WSB_REDIS_URL); extra flags after the image name are passed
# to `wsbroker serve` and win over the environment.
#
# tests/test_deploy.py checks the invariants of this file (non-root user,
# EXPOSE 8765, HEALTHCHECK on /healthz, STOPSIGNAL SIGTERM, exec-form
# ENTRYPOINT, WSB_HOST=0.0.0.0) and runs the same steps without Docker.

# -- builder: the wsbroker wheel and wheels of all its runtime dependencies ----
FROM python:3.12-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# .dockerignore lets in only pyproject.toml, README.md, LICENSE and wsbroker/.
COPY . .
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m pip wheel --wheel-dir /wheels "$(ls /wheels/wsbroker-*.whl)[speed]"

# -- runtime: only the installed wheels, no compiler, no source ---------------
FROM python:3.12-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# The wheels are bind-mounted from the builder for this one step, so they do
# not end up in a layer of the final image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels "wsbroker[speed]" \
 && groupadd --system --gid 10001 wsbroker \
 && useradd --system --uid 10001 --gid wsbroker --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin wsbroker

# Listen on every interface of the container; the rest is the operator's
# (WSB_REDIS_URL, WSB_JWT_SECRET or WSB_JWT_PUBLIC_KEY or WSB_JWKS_URL,
# WSB_TRUSTED_PROXIES, WSB_DRAIN_SECONDS, ...).
ENV WSB_HOST=0.0.0.0 \
    WSB_PORT=8765 \
    WSB_LOG_FORMAT=json

# Numeric, so Kubernetes' runAsNonRoot can check it without /etc/passwd.
USER 10001:10001

EXPOSE 8765

# Liveness only (/healthz: the process answers). Readiness (/readyz: Redis up,
# not draining) belongs to the load balancer / Kubernetes readinessProbe.
# No curl in the image: a Python one-liner, https when native TLS is on.
# It reads WSB_PORT: set the port with WSB_PORT rather than --port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request as u; tls = bool(os.environ.get('WSB_TLS_CERT')); u.urlopen(('https' if tls else 'http') + '://127.0.0.1:' + os.environ.get('WSB_PORT', '8765') + '/healthz', timeout=2, context=ssl._create_unverified_context() if tls else None)"]

# SIGTERM starts the graceful drain: /readyz turns 503, clients are closed with
# 1012 spread over --drain-seconds, then the process exits 0. Give the
# container a stop timeout above drain-seconds + 15 (docker stop -t,
# compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM

# Exec form: wsbroker is PID 1 and receives SIGTERM itself (no shell between).
ENTRYPOINT ["wsbroker", "serve"]
