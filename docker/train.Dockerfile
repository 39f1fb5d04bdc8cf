# syntax=docker/dockerfile:1
# Training image: runs `mnist-k8s train`, which executes the training notebook with papermill.
# Build from the repository root: docker build -f docker/train.Dockerfile -t mnist-k8s-train .
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
# The base `requirements` and the `train` extra's `train_requirements`: papermill, ipykernel (whose wheel
# installs the `python3` kernelspec into /opt/venv/share/jupyter/kernels), nbconvert and matplotlib.
RUN python -c "import configparser, sys; c = configparser.ConfigParser(interpolation=None); c.read('settings.ini'); print('\n'.join(r for key in sys.argv[1:] for r in c['DEFAULT'][key].split()))" requirements train_requirements > requirements.txt

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

# ---- run stage: the venv, the notebook, a non-root user; no compilers, no pip cache --------------------
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

LABEL org.opencontainers.image.title="mnist-k8s-train" \
      org.opencontainers.image.description="Trains the MNIST classifier by executing nbs/train.ipynb with papermill" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric non-root user; /var/lib/mnist-k8s is where Kubernetes mounts the volume, owned by that user so a
# fresh `docker run -v mnist-k8s:/var/lib/mnist-k8s ...` named volume is writable too.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin app \
 && install -d -o 10001 -g 10001 -m 0755 /var/lib/mnist-k8s

COPY --from=build /opt/venv /opt/venv
COPY nbs/train.ipynb /app/train.ipynb

# HOME=/tmp: Jupyter's runtime files (kernel connection files), IPython's profile and matplotlib's cache go
# to the one writable place when the root filesystem is read-only (Kubernetes mounts an emptyDir there).
# No MPLBACKEND: ipykernel makes matplotlib_inline the kernel's backend only when MPLBACKEND is unset, and
# that backend is what puts the report's figures into the notebook (Agg would draw them nowhere).
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    MNIST_K8S_TRAIN_NOTEBOOK=/app/train.ipynb \
    MNIST_K8S_MODEL_DIR=/var/lib/mnist-k8s/models \
    MNIST_K8S_DATA_ROOT=/var/lib/mnist-k8s/data

WORKDIR /app
USER 10001:10001

# Fail the build, not the first training run, if papermill could not find the `python3` kernel as this user.
RUN python -c "from jupyter_client.kernelspec import KernelSpecManager as K; \
specs = K().find_kernel_specs(); assert 'python3' in specs, specs; print('kernelspec python3:', specs['python3'])"

# A batch job: it exits when training is done, so there is no service whose health could be checked;
# Kubernetes follows the Job through its exit code. Say so explicitly instead of leaving it undefined.
HEALTHCHECK NONE
ENTRYPOINT ["mnist-k8s"]
CMD ["train"]
