# modelport: serve the bundled models (or your own) over HTTP on port 8000, and over gRPC (the
# Open Inference Protocol, docs/grpc.md) on port 8001.
#
#   docker build -t modelport .                       # CPU torch from the PyTorch CPU index
#   docker run -p 8000:8000 -p 8001:8001 modelport
#
# Build arguments:
#   TORCH_VERSION     torch release to install (default 2.13.0; >= 2.10 is required)
#   TORCH_INDEX_URL   where torch comes from (default the CPU-only index; e.g.
#                     https://download.pytorch.org/whl/cu128 for a CUDA build)
#   TORCH_FIND_LINKS  install torch from a pip --find-links location instead: the build
#                     context's wheels/ folder is copied to /tmp/wheels, so
#                     `pip download torch==2.13.0 --no-deps -d wheels/` then
#                     `--build-arg TORCH_FIND_LINKS=/tmp/wheels` builds with no access to the
#                     PyTorch index (torch's own dependencies still come from PyPI)
# BuildKit is required (the default builder of Docker 23+; DOCKER_BUILDKIT=1 on older ones).

FROM python:3.11-slim AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=

ENV PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# "wheel[s]" matches nothing (and copies nothing) when the context has no wheels/ folder.
COPY wheel[s] /tmp/wheels/

# torch first and on its own layer: it is most of the image and changes least often. The
# pruned folders are C++ test binaries and headers, needed only to compile extensions.
SHELL ["/bin/sh", "-eux", "-c"]
RUN if [ -n "$TORCH_FIND_LINKS" ]; then \
        pip install --no-cache-dir --find-links "$TORCH_FIND_LINKS" "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    fi; \
    site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
    rm -rf "$site/torch/test" "$site/torch/include"; \
    find "$site/torch/bin" -mindepth 1 ! -name torch_shm_manager -exec rm -rf {} +; \
    rm -rf /tmp/wheels

# The service's dependencies, read from pyproject.toml, so that editing the code does not
# reinstall them.
COPY pyproject.toml /src/
RUN python -c 'import tomllib; deps = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]; open("/tmp/requirements.txt", "w").write("\n".join(deps))'; \
    pip install --no-cache-dir -r /tmp/requirements.txt

COPY README.md /src/
COPY app /src/app
COPY models /src/models
RUN pip install --no-cache-dir --no-deps /src


FROM python:3.11-slim AS runtime

# A fixed numeric uid/gid (10001), so that Kubernetes' runAsNonRoot can check it and a volume
# can be prepared for it (fsGroup 10001).
RUN groupadd --system --gid 10001 modelport \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin modelport \
    && mkdir -p /var/lib/modelport/store \
    && chown -R 10001:10001 /var/lib/modelport

COPY --from=build /opt/venv /opt/venv
COPY modelport.toml /srv/modelport/
COPY weights /srv/modelport/weights

# Binding every interface is right inside a container only: the port is reachable solely
# where `docker run -p` or a Service publishes it. Every other setting is MODELPORT_* too.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MODELPORT_HOST=0.0.0.0 \
    MODELPORT_PORT=8000 \
    MODELPORT_GRPC_PORT=8001 \
    MODELPORT_CONFIG=/srv/modelport/modelport.toml \
    MODELPORT_STORE_DIR=/var/lib/modelport/store

WORKDIR /srv/modelport
USER 10001:10001
VOLUME ["/var/lib/modelport/store"]
EXPOSE 8000 8001

# Ready means every configured model can serve; urllib needs no curl in the image, and the
# empty ProxyHandler keeps any HTTP(S)_PROXY in the environment away from loopback.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health/ready' % os.environ.get('MODELPORT_PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "app"]
