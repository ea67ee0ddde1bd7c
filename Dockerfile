# syntax=docker/dockerfile:1
# Image of every component: python -m worker model|env|aggregator|evolution|control|demo.
#   docker build -t rl-stream-worker .
#   docker run --rm rl-stream-worker model --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

WORKDIR /app

# 1. The CPU build of torch, first and from the PyTorch CPU index: resolved from PyPI it would pull
#    the CUDA build (several GB). Its own layer, so code changes never reinstall it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.3,<3"

# 2. The other dependencies, from pyproject.toml alone (cached until it changes): install a stub
#    package of the same name, then drop it (torch above already satisfies "torch>=2.3,<3").
COPY pyproject.toml README.md ./
RUN mkdir worker && touch worker/__init__.py \
    && pip install . \
    && pip uninstall -y rl-stream-worker \
    && rm -rf worker build ./*.egg-info

# 3. The project itself (no test extras; its dependencies are all in place by now).
COPY worker ./worker
RUN pip install . && rm -rf build ./*.egg-info

# Unprivileged at run time; /out (the control service's volume) and the home directory are
# writable, so relative outputs such as "demo --plot demo-curve.png" work too.
RUN groupadd --gid 10001 worker \
    && useradd --create-home --uid 10001 --gid worker worker \
    && mkdir -p /out && chown worker:worker /out
USER 10001:10001
WORKDIR /home/worker

ENTRYPOINT ["python", "-m", "worker"]
CMD ["model"]
