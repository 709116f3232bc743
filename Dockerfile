# ringproxy container image.
#
#   docker build -t ringproxy .
#   docker run --rm -p 8080:8080 -v "$PWD/deploy:/etc/ringproxy:ro" \
#       -v ringproxy-state:/var/lib/ringproxy ringproxy
#
# The config is read from /etc/ringproxy/config.yaml: mount the directory (a Kubernetes
# ConfigMap, or a host directory), not the single file, so updates to it are seen. In a
# container the config's `listen` must be 0.0.0.0:8080 (or [::]:8080): 127.0.0.1 inside
# the container is unreachable from outside it. tests/test_dockerfile.py checks what this
# file promises.

ARG PYTHON_VERSION=3.12

# ---------------------------------------------------------------------------- stage 1: build
# Wheels of the project and of every dependency. Nothing of this stage but /wheels reaches
# the final image, so the build tools stay here.
FROM python:${PYTHON_VERSION}-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc compiles the data plane (mypyc, setup.py); the official images have Python's headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy/ proxy/

RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip wheel --no-cache-dir --wheel-dir /wheels /wheels/ringproxy-*.whl

# -------------------------------------------------------------------------- stage 2: runtime
FROM python:${PYTHON_VERSION}-slim AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ringproxy" \
      org.opencontainers.image.description="Edge reverse proxy for ring-based progressive delivery" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, numeric UID/GID, so volume ownership is predictable and Kubernetes'
# runAsNonRoot can verify the user without a passwd lookup.
RUN groupadd --system --gid 10001 ringproxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/ringproxy --shell /usr/sbin/nologin ringproxy \
 && mkdir -p /etc/ringproxy /var/lib/ringproxy \
 && chown 10001:10001 /var/lib/ringproxy

# Install from the wheels only (no index); the wheels are bind-mounted from stage 1 for
# this one step, so they never become a layer of the final image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels ringproxy \
 && ringproxy --version

WORKDIR /var/lib/ringproxy
VOLUME ["/etc/ringproxy", "/var/lib/ringproxy"]

# 8080: the proxy (config `listen`); 9901: the admin listener (`admin.listen`, /healthz).
EXPOSE 8080 9901

USER 10001:10001

# The admin listener defaults to 127.0.0.1:9901; the check runs inside the container, so
# loopback reaches it. Python's stdlib only: slim images have no curl. urlopen raises
# (exit 1) on a refused connection, a timeout or any non-2xx status.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=3)"]

# Exec form: ringproxy is PID 1 and gets SIGTERM itself (graceful drain, up to the
# config's shutdown_grace: give `docker stop -t` / terminationGracePeriodSeconds more).
STOPSIGNAL SIGTERM
ENTRYPOINT ["ringproxy"]
CMD ["run", "--config", "/etc/ringproxy/config.yaml"]
