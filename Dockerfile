# syntax=docker/dockerfile:1
#
# backburner's image: the API (`serve`), the worker (`worker`) and migrations (`db upgrade`)
# from one image. docs/deploy.md has the details.
#
#   docker build -t backburner .                                   # PostgreSQL, no embedded model
#   docker build -t backburner:embedded --build-arg WITH_EMBEDDED=true .   # + llama.cpp, SmolLM2
#
# The embedded engine compiles llama-cpp-python from source: the compilers live in the builder
# stage only; the runtime stage gets the finished virtual environment (and libgomp1, which the
# compiled library links against).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder
ARG WITH_EMBEDDED=false

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN if [ "$WITH_EMBEDDED" = "true" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends build-essential cmake \
        && rm -rf /var/lib/apt/lists/*; \
    fi

RUN python -m venv /opt/backburner
ENV PATH=/opt/backburner/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src

# the pip cache survives between builds (a rebuild with the embedded engine then reuses the
# compiled llama-cpp-python wheel instead of compiling it again)
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "$WITH_EMBEDDED" = "true" ]; then extras="local,postgres"; else extras="postgres"; fi \
    && pip install ".[${extras}]" \
    && backburner version

# ---------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
ARG WITH_EMBEDDED=false

RUN if [ "$WITH_EMBEDDED" = "true" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends libgomp1 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 backburner \
    && useradd --system --uid 10001 --gid backburner --home-dir /var/lib/backburner \
        --create-home --shell /usr/sbin/nologin backburner

COPY --from=builder /opt/backburner /opt/backburner

# BACKBURNER_HOST: a container is reached from outside its loopback, so it listens on every
# address; that makes API keys required (auth = "auto": a non-loopback listener needs keys).
# BACKBURNER_FILES_DIR: uploads when files_url is unset (a volume, or set files_url = s3://...).
ENV PATH=/opt/backburner/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BACKBURNER_HOST=0.0.0.0 \
    BACKBURNER_PORT=8000 \
    BACKBURNER_FILES_DIR=/var/lib/backburner/files

WORKDIR /var/lib/backburner
USER 10001:10001
EXPOSE 8000

# /healthz answers once the process serves (after its migrations); slim has no curl. A worker
# container listens on nothing: compose turns this check off for it (Kubernetes ignores it).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('BACKBURNER_PORT', '8000') + '/healthz', timeout=4)"]

ENTRYPOINT ["backburner"]
# An API replica for a fleet (workers run as `backburner worker`). One container on its own:
# `docker run ... backburner serve` runs the API with a worker in the same process.
CMD ["serve", "--host", "0.0.0.0", "--no-worker"]
