"""What `status`, `wait` and `submit --wait` print: a job's id and error are text, whatever they hold."""

import io

import pytest
from rich.console import Console

from common.manifest import Batch, JobStatus
from producer.follow import print_summary

pytestmark = pytest.mark.unit


def test_markup_in_a_job_id_or_error_is_printed_as_written_in_a_terminal_table():
    entry = {"id": "[reverse]X[/reverse]", "key": "ab" * 32, "lora_scale": 1.0, "seed": 1, "video": None}
    failed = entry | {"id": "[link=file:///etc]y", "status": JobStatus.FAILED, "error": "[bold red]boom"}
    batch = Batch("b", [entry | {"status": JobStatus.DONE, "error": None, "video": "/v/[x].mp4"}, failed])
    out = io.StringIO()
    print_summary(batch, Console(file=out, force_terminal=True, width=200, color_system=None))
    text = out.getvalue()
    assert "[reverse]X[/reverse]" in text and "[bold red]boom" in text and "[link=file:///etc]y" in text
