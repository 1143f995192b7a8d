# tower-gateway container image.
#
#   docker build -t tower-gateway .
#   docker run --read-only --tmpfs /tmp -p 8080:8080 \
#     -v "$PWD/gateway.yaml:/etc/tower-gateway/gateway.yaml:ro" \
#     -v tower-gateway-data:/var/lib/tower-gateway \
#     -e GATEWAY_JWT_SECRET -e GATEWAY_ADMIN_TOKEN \
#     tower-gateway
#
# The config is mounted, never baked in; secrets come from the environment
# (`${VAR}` in gateway.yaml; a remote tower also needs -e TOWER_API_KEY -e TOWER_SECRET).
# State lives in the data directory /var/lib/tower-gateway (a volume owned by uid 10001,
# $TOWER_GATEWAY_DATA_DIR): the embedded tower's database and its `<db>.secret` go there
# because the config directory is read-only. Back that volume up. The ops listener
# (ops.port, 9091) must listen on 127.0.0.1 or 0.0.0.0 for the HEALTHCHECK below; use
# 0.0.0.0 when probes or Prometheus reach it from outside the container.
# `serve --workers N` keeps its workers' private sockets under $TMPDIR (/tmp): give a
# read-only container a writable /tmp.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements ./requirements
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# Exact versions with hashes from the lock. The build backend comes from the lock
# too (--no-build-isolation); the wheel is then installed under a prefix of its
# own, so the runtime stage receives the project and its dependencies without
# the sources.
RUN pip install --require-hashes -r requirements/runtime.txt \
    && pip wheel --no-deps --no-build-isolation -w /wheels . \
    && pip install --prefix=/install --require-hashes -r requirements/runtime.txt \
    && pip install --prefix=/install --no-deps /wheels/*.whl

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOWER_GATEWAY_CONFIG=/etc/tower-gateway/gateway.yaml \
    TOWER_GATEWAY_DATA_DIR=/var/lib/tower-gateway
COPY --from=build /install /usr/local
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it. The config directory
# stays root's (read-only for the gateway); the data directory is the gateway's.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
    && mkdir -p /etc/tower-gateway \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/tower-gateway
VOLUME ["/var/lib/tower-gateway"]
USER 10001:10001
EXPOSE 8080 9091
# python:3.11-slim has no curl; urlopen raises (exit 1) on any non-2xx answer.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9091/healthz', timeout=3).status == 200 else 1)"]
CMD ["tower-gateway", "serve", "--host", "0.0.0.0"]
