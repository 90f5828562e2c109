# splitserve, CPU image: the built-in OCR demo (PP-OCRv4 on ONNX Runtime) in split mode.
#
#   docker build -t splitserve:cpu .
#   docker run --rm -p 127.0.0.1:8000:8000 --shm-size=1g splitserve:cpu
#
# Tensors move between the processes through /dev/shm: Docker's default of 64 MiB is too
# small under load (--shm-size; on Kubernetes a memory emptyDir, see deploy/).
# The GPU variant is Dockerfile.cuda.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPLITSERVE_CACHE_DIR=/tmp/splitserve-cache

# OpenCV (brought by rapidocr) loads libGL and GLib when imported.
# Debian's point releases replace these versions: pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# ROLE=server (default): the package with EXTRAS ("ocr": the demo). ROLE=transformer:
# the KServe transformer image of deploy/kserve/split-inferenceservice.yaml, kserve and
# deploy/kserve/requirements.txt with the package beside it without its server
# dependencies (kserve pins protobuf < 7; the server's gRPC needs >= 7).
ARG ROLE=server
ARG EXTRAS=ocr

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY deploy/kserve/requirements.txt ./deploy/kserve/requirements.txt
# The package from this tree (pinned by the tree itself, not by a version).
# hadolint ignore=DL3013
RUN if [ "$ROLE" = transformer ]; then \
        pip install -r deploy/kserve/requirements.txt && pip install --no-deps . ; \
    else \
        pip install ".[${EXTRAS}]" ; \
    fi
# The demo service is imported as examples.ocr.service from the working directory, the
# transformer as deploy.kserve.transformer.
COPY examples/ocr ./examples/ocr
COPY deploy/kserve/transformer.py ./deploy/kserve/transformer.py

# A numeric non-root user, so that Kubernetes' runAsNonRoot can check it.
RUN useradd --system --uid 10001 --gid 0 --no-create-home --home-dir /tmp splitserve
USER 10001

EXPOSE 8000
# Docker's own probe (Kubernetes uses the Deployment's probes on the same routes).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
# SIGTERM starts the drain: readiness turns 503, admitted requests finish within
# --drain-timeout, then every process stops. Kubernetes' terminationGracePeriodSeconds
# must exceed it (deploy/ sets 45 s for the 30 s drain).
STOPSIGNAL SIGTERM

ENTRYPOINT ["splitserve", "serve"]
# 0.0.0.0 inside the container only, where the container's own network namespace is the
# boundary: outside containers splitserve always binds 127.0.0.1 (its default).
CMD ["examples.ocr.service:OCRService", "--host", "0.0.0.0", "--port", "8000", "--cpu-workers", "2", "--drain-timeout", "30"]
