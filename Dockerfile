# syntax=docker/dockerfile:1
# olmocr-serve on the official vLLM image: the supervised server (python -m olmocr.vllm_server_manager)
# as the entrypoint, and the pipeline in the same image (python -m olmocr.pipeline).
#   docker build -t olmocr-serve:0.1.0 .
#   docker run --gpus all -p 30024:30024 -v /data/models:/models -v /etc/olmocr/api-key:/run/secrets/api-key:ro \
#     -e OLMOCR_HOST=0.0.0.0 -e OLMOCR_API_KEY_FILE=/run/secrets/api-key olmocr-serve:0.1.0
# VLLM_VERSION: 0.32.0 is the release the real-vLLM tier runs (docs/real-vllm.md); any release of the gpu
# extra's tested range 0.11.2-0.33.0 works (docs/operations.md, vLLM versions), e.g. 0.11.2, upstream's image.
# This image is not built by the project's CI (no container engine or registry there): docs/kubernetes.md.
ARG VLLM_VERSION=0.32.0
FROM vllm/vllm-openai:v${VLLM_VERSION}

# tini as PID 1: forwards SIGTERM to the manager alone and reaps the orphans a killed vLLM leaves.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

COPY setup.cfg pyproject.toml README.md /src/
COPY olmocr /src/olmocr
COPY deploy/container/install-olmocr.sh /usr/local/bin/install-olmocr
RUN install-olmocr /src && rm -rf /src

# A non-root user. HOME holds vLLM's and torch's caches; /models is the model volume: HF_HOME puts the
# Hugging Face cache on it, so weights already there are never downloaded again (with HF_HUB_OFFLINE=1
# nothing is asked of the Hub at all). An absolute OLMOCR_MODEL (/models/olmOCR-7B-0825-FP8) reads a
# plain directory instead.
RUN groupadd --gid 10001 olmocr \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/olmocr --shell /usr/sbin/nologin olmocr \
    && mkdir -p /models /run/olmocr \
    && chown olmocr:olmocr /models /run/olmocr
# vLLM and the status service bind 127.0.0.1 unless told otherwise: to publish a port, set
# OLMOCR_HOST=0.0.0.0 together with a key (OLMOCR_API_KEY_FILE), as the Kubernetes manifests do.
ENV HOME=/home/olmocr \
    HF_HOME=/models/hf \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/olmocr
VOLUME ["/models"]
EXPOSE 30024 29999

# vLLM's own /health stays 200 on a hung engine: the image's health check is the status service's probe.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:29999/livez', timeout=8).status != 200)"]

ENTRYPOINT ["tini", "--", "python3", "-m", "olmocr.vllm_server_manager", "--run-dir=/run/olmocr", "--log-file=/run/olmocr/manager.log"]
CMD []
