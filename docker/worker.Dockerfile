# A lorafleet GPU worker: one worker per container, the GPU given by the container runtime
# (`--gpus device=N`, or compose's device reservation), so inside it is always cuda:0.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/models/hf \
    LORAFLEET_STORE_URL=/store
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY producer ./producer
COPY workers ./workers
COPY lorafleet ./lorafleet
# torch comes with the base image (CUDA build); pip keeps it since it satisfies the range.
RUN pip install --no-cache-dir ".[worker,s3]"

# SIGTERM finishes the current job first: give `docker stop` time (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["lorafleet", "worker", "--device", "cuda"]
