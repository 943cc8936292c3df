"""common/logs.py, torch-free: a JSON record a line with the process's and the job's fields, at
the level the settings give."""

import json
import logging
import threading

import pytest

from common.logs import configure_logging, job_fields, set_process_fields

pytestmark = pytest.mark.unit


@pytest.fixture
def captured(capsys):
    yield capsys
    configure_logging("text", "INFO")
    logging.captureWarnings(False)


def test_json_records_carry_the_worker_and_only_their_own_jobs_fields(captured):
    configure_logging("json", "WARNING")
    set_process_fields(worker="gpu0@host")
    log = logging.getLogger("lorafleet.test")
    log.info("not at WARNING")

    def other_job():
        with job_fields(key="b" * 64, batch="other"):
            log.warning("in the other thread")

    with job_fields(key="a" * 64, batch="nightly"):
        thread = threading.Thread(target=other_job)
        thread.start()
        thread.join()
        log.warning("rendered in %.1fs", 1.25)
    log.error("after the job")
    records = [json.loads(line) for line in captured.readouterr().err.splitlines()]
    assert [r["message"] for r in records] == ["in the other thread", "rendered in 1.2s", "after the job"]
    assert records[0]["key"] == "b" * 64 and records[0]["batch"] == "other"
    assert records[1]["key"] == "a" * 64 and records[1]["batch"] == "nightly" and records[1]["level"] == "WARNING"
    assert "key" not in records[2] and all(r["worker"] == "gpu0@host" for r in records)
    assert records[1]["time"].endswith("+00:00") and records[1]["logger"] == "lorafleet.test"
