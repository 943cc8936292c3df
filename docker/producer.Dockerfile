# The lorafleet producer: submit, wait, report. No torch, no GPU.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY producer ./producer
COPY workers ./workers
COPY lorafleet ./lorafleet
RUN pip install --no-cache-dir ".[s3,report]"

# One-shot commands (submit, sweep, status) end with an exit code; nothing long-running to probe.
HEALTHCHECK NONE
ENTRYPOINT ["lorafleet"]
CMD ["--help"]
