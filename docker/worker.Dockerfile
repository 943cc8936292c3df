# A lorafleet GPU worker: one worker per container, the GPU given by the container runtime
# (`--gpus device=N`, or compose's device reservation), so inside it is always cuda:0.
# torch comes from PyPI at the version the test suite ran (docker/constraints.txt): its wheels
# bring the CUDA libraries, and the host's driver comes in through the NVIDIA container runtime.
# The Python is the suite's (3.11). BASE_IMAGE: a build machine that cannot pull it builds the same
# from Debian's packages (docker/python-base.Dockerfile; docker/build-images.sh does).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# A C and C++ compiler: Triton builds its launcher at a GPU kernel's first launch and inductor
# compiles CPU kernels, so without them `--compile` and every compiled tier fail in the image. The
# base's Debian release fixes their versions (pinning Debian revisions breaks at each point release).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root user (numeric, so Kubernetes' runAsNonRoot can check it); its caches
# (Hugging Face, lorafleet's adapters, Triton, torch's inductor) live under one writable folder.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/lorafleet lorafleet
ENV PYTHONUNBUFFERED=1 \
    HOME=/home/lorafleet \
    XDG_CACHE_HOME=/home/lorafleet/.cache \
    HF_HOME=/home/lorafleet/.cache/huggingface \
    TRITON_CACHE_DIR=/home/lorafleet/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/home/lorafleet/.cache/inductor \
    LORAFLEET_STORE_URL=/store \
    LORAFLEET_METRICS_PORT=9400 \
    LORAFLEET_METRICS_HOST=0.0.0.0
WORKDIR /app
COPY docker/install-python.sh docker/constraints.txt ./docker/
COPY pyproject.toml README.md ./
# How this build reaches its package index, where that is not the default (a CA bundle, a folder
# of wheels, mounted for the build): set only by docker/build-images.sh on such a machine, never
# in a user's build, which takes PyPI's torch with its CUDA libraries.
ARG PIP_CERT
ARG PIP_FIND_LINKS
# The dependencies first, in a layer of their own (the project's packages empty for now): a change
# to lorafleet's code rebuilds only the small layer below, not gigabytes of torch and CUDA.
RUN mkdir common producer workers lorafleet \
    && docker/install-python.sh pip ".[worker,s3]" --no-cache-dir \
    && rm -r common producer workers lorafleet
COPY common ./common
COPY producer ./producer
COPY workers ./workers
COPY lorafleet ./lorafleet
RUN pip install --no-cache-dir --no-deps --force-reinstall --progress-bar off . \
    && mkdir -p /home/lorafleet/.cache && chown -R lorafleet:lorafleet /home/lorafleet/.cache
USER 10001:10001

# /metrics for Prometheus; /healthz (alive, heartbeat fresh) and /readyz (model loaded, broker connected).
EXPOSE 9400
# The model takes minutes to load on a cold host: the start period covers it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9400/healthz', timeout=4)"]

# SIGTERM finishes the current job first: give `docker stop` time (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["lorafleet", "worker", "--device", "cuda"]
