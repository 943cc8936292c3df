# The lorafleet producer: submit, wait, report, the exporter. No torch, no GPU.
# The Python and the versions are the test suite's (docker/constraints.txt).
FROM python:3.11-slim

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/lorafleet lorafleet
ENV PYTHONUNBUFFERED=1 \
    HOME=/home/lorafleet \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    LORAFLEET_METRICS_HOST=0.0.0.0
WORKDIR /app
COPY docker/constraints.txt ./docker/
COPY pyproject.toml README.md ./
COPY common ./common
COPY producer ./producer
COPY workers ./workers
COPY lorafleet ./lorafleet
# No torch here: the producer's extras only, held to the suite's versions.
RUN pip install --no-cache-dir --progress-bar off -c docker/constraints.txt ".[s3,report]"
USER 10001:10001

# One-shot commands (submit, sweep, status) end with an exit code; the exporter is probed by its orchestrator.
HEALTHCHECK NONE
ENTRYPOINT ["lorafleet"]
CMD ["--help"]
