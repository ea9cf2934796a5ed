# syntax=docker/dockerfile:1
# The writeguard worker image.
#
#   docker build -t writeguard:0.1.0 .
#   docker run --rm -p 9464:9464 -v "$PWD/my-config.yaml:/etc/writeguard/writeguard.yaml:ro" writeguard:0.1.0
#
# The config is mounted as a file at /etc/writeguard/writeguard.yaml; secrets come in as environment variables that
# the config names with ${ENV_VAR}. Any other subcommand runs too, e.g.
#   docker run --rm -v ...:/etc/writeguard/writeguard.yaml:ro writeguard:0.1.0 connector-config -c /etc/writeguard/writeguard.yaml
#
# Two stages: the build stage has a compiler (for any dependency without a wheel on the target platform: on amd64
# every dependency has one, on arm64 faust-streaming does not) and builds a virtualenv in /opt/venv; the final stage
# copies only that virtualenv onto a clean slim base.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Only for dependencies without a wheel for the platform (faust-streaming on arm64); unpinned: Debian's security
# updates replace exact versions.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so that a source change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
# The product only: the testbed (local Kafka, Connect, PostgreSQL, demos), tests and benchmarks are not even in
# the build context (.dockerignore; tests/deploy/test_dockerfile.py checks both).
COPY README.md ./
COPY stream ./stream
COPY detectors ./detectors
COPY undo ./undo
COPY connectors ./connectors
RUN pip install --no-deps . \
 && writeguard --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="writeguard" \
      org.opencontainers.image.description="Alerts on and quarantines AI agents whose database writes look wrong, from Debezium change events on Kafka." \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 writeguard \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/writeguard --no-create-home \
      --shell /usr/sbin/nologin writeguard \
 && mkdir -p /etc/writeguard /var/lib/writeguard \
 && chown 10001:10001 /var/lib/writeguard
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The worker's Faust data folder defaults to ./<group.id>-data, so the working directory must be writable.
# (With a read-only root filesystem, mount a volume here or pass --datadir.)
WORKDIR /var/lib/writeguard
USER 10001:10001
# Prometheus /metrics (worker.metrics.port).
EXPOSE 9464
# slim has no curl: ask the metrics endpoint with the standard library. It answers once the worker has created its
# topics and started; a worker run with another --metrics-port needs its own health check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/metrics', timeout=4).read(1)"]
ENTRYPOINT ["writeguard"]
CMD ["worker", "--config", "/etc/writeguard/writeguard.yaml"]
