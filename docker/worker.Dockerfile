# A lorafleet GPU worker: one worker per container, the GPU given by the container runtime
# (`--gpus device=N`, or compose's device reservation), so inside it is always cuda:0.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/models/hf \
    LORAFLEET_STORE_URL=/store \
    LORAFLEET_METRICS_PORT=9400
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY producer ./producer
COPY workers ./workers
COPY lorafleet ./lorafleet
# torch comes with the base image (CUDA build); pip keeps it since it satisfies the range.
RUN pip install --no-cache-dir ".[worker,s3]"

# /metrics for Prometheus; /healthz (alive, heartbeat fresh) and /readyz (model loaded, broker connected).
EXPOSE 9400
# The model takes minutes to load on a cold host: the start period covers it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9400/healthz', timeout=4)"]

# SIGTERM finishes the current job first: give `docker stop` time (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["lorafleet", "worker", "--device", "cuda"]
