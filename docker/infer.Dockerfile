# syntax=docker/dockerfile:1
# Inference image: `mnist-k8s serve` (FastAPI under gunicorn). No Jupyter, no papermill: only the package's base
# requirements. Build from the repository root: docker build -f docker/infer.Dockerfile -t mnist-k8s-infer .
# (Skaffold does this for you: see skaffold.yaml.)
#
# The base image is pinned by tag and digest (the multi-platform index of python:3.11-slim-bookworm).
# Let Renovate or Dependabot refresh the digest; every stage must use the same one, because the virtual
# environment built in the build stage points at that interpreter.

# ---- requirements stage: the dependency list, from settings.ini alone --------------------------------
# settings.ini is the one list of dependencies (setup.py reads the same keys). Writing it out in a stage of
# its own means the build stage below copies only the generated file: BuildKit reuses the cached install
# layers as long as the list itself is unchanged, whatever else changes in settings.ini (a version bump).
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS requirements
WORKDIR /req
COPY settings.ini ./
# The base `requirements` only: no Jupyter, papermill or matplotlib.
RUN python -c "import configparser, sys; c = configparser.ConfigParser(interpolation=None); c.read('settings.ini'); print('\n'.join(r for key in sys.argv[1:] for r in c['DEFAULT'][key].split()))" requirements > requirements.txt

# ---- build stage: a virtual environment with CPU-only torch, the dependencies, then the package ---------
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# CPU wheels first, from PyTorch's CPU index: the `torch==2.14.1` requirement of the package is then met by
# 2.14.1+cpu (PEP 440 ignores the local label) and pip never fetches the much larger CUDA build from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1

# Every dependency before any source is copied: editing the code reuses these layers.
COPY --from=requirements /req/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

WORKDIR /src
COPY setup.py settings.ini pyproject.toml MANIFEST.in README.md LICENSE ./
COPY mnist_k8s/ mnist_k8s/
# The package alone (its dependencies are all installed above; `pip check` proves the list was complete).
# Templates and static files come along as package data (MANIFEST.in). pip byte-compiles everything, so
# the read-only root filesystem at run time costs nothing at import.
RUN pip install --no-deps . \
 && pip check

# ---- run stage: the venv and a non-root user; no compilers, no pip cache --------------------------------
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

LABEL org.opencontainers.image.title="mnist-k8s-infer" \
      org.opencontainers.image.description="Serves the published MNIST classifier over HTTP (FastAPI)" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric non-root user; /var/lib/mnist-k8s is where Kubernetes mounts the volume, owned by that user so a
# fresh `docker run -v mnist-k8s:/var/lib/mnist-k8s ...` named volume is writable too.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin app \
 && install -d -o 10001 -g 10001 -m 0755 /var/lib/mnist-k8s

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MNIST_K8S_HOST=0.0.0.0 \
    MNIST_K8S_PORT=8000 \
    MNIST_K8S_MODEL_DIR=/var/lib/mnist-k8s/models

WORKDIR /app
USER 10001:10001
EXPOSE 8000

# For `docker run`; Kubernetes ignores HEALTHCHECK and uses the probes in k8s/base/inference.yaml.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MNIST_K8S_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["mnist-k8s"]
CMD ["serve"]
