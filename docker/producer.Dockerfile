# The lorafleet producer: submit, wait, report, the exporter. No torch, no GPU.
# The Python and the versions are the test suite's (docker/constraints.txt). BASE_IMAGE: as in
# docker/worker.Dockerfile.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/lorafleet lorafleet
ENV PYTHONUNBUFFERED=1 \
    HOME=/home/lorafleet \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    LORAFLEET_METRICS_HOST=0.0.0.0
WORKDIR /app
COPY docker/constraints.txt ./docker/
COPY pyproject.toml README.md ./
# How this build reaches its package index where that is not the default: docker/worker.Dockerfile says.
ARG PIP_CERT
ARG PIP_FIND_LINKS
# No torch here: the producer's extras only, held to the suite's versions; the dependencies in a
# layer of their own, as in docker/worker.Dockerfile.
RUN mkdir common producer workers lorafleet \
    && pip install --no-cache-dir --progress-bar off -c docker/constraints.txt ".[s3,report]" \
    && rm -r common producer workers lorafleet
COPY common ./common
COPY producer ./producer
COPY workers ./workers
COPY lorafleet ./lorafleet
RUN pip install --no-cache-dir --no-deps --force-reinstall --progress-bar off .
USER 10001:10001

# One-shot commands (submit, sweep, status) end with an exit code; the exporter is probed by its orchestrator.
HEALTHCHECK NONE
ENTRYPOINT ["lorafleet"]
CMD ["--help"]
