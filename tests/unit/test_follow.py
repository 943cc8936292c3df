"""What `status`, `wait` and `submit --wait` print: a job's id and error are text, whatever they hold."""

import io

import pytest
from rich.console import Console

from common.manifest import Batch, JobStatus, ManifestEntry
from producer.follow import print_summary

pytestmark = pytest.mark.unit


def test_markup_in_a_job_id_or_error_is_printed_as_written_in_a_terminal_table():
    entry = {"id": "[reverse]X[/reverse]", "key": "ab" * 32, "lora_scale": 1.0, "seed": 1, "video": None}
    failed = entry | {"id": "[link=file:///etc]y", "status": JobStatus.FAILED, "error": "[bold red]boom"}
    done = entry | {"status": JobStatus.DONE, "error": None, "video": "/v/[x].mp4"}
    batch = Batch("b", [ManifestEntry(**done), ManifestEntry(**failed)])
    out = io.StringIO()
    print_summary(batch, Console(file=out, force_terminal=True, width=200, color_system=None))
    text = out.getvalue()
    assert "[reverse]X[/reverse]" in text and "[bold red]boom" in text and "[link=file:///etc]y" in text


def test_the_eta_is_the_median_job_time_times_the_jobs_left_over_the_workers():
    from producer.follow import eta_s, format_duration

    def entry(status, seconds=None):
        return ManifestEntry(key="k", status=status, seconds=seconds)

    done = [entry(JobStatus.DONE, s) for s in (10.0, 20.0, 30.0, 100.0)] + [
        entry(JobStatus.DONE)
    ]  # one was in the store
    left = [entry(JobStatus.QUEUED)] * 5 + [entry(JobStatus.RUNNING)]
    batch = Batch("b", done + left)
    assert eta_s(batch, workers=2) == 30.0 * 6 / 2  # the median of 10, 20, 30, 100 (upper) is 30
    assert eta_s(batch, workers=0) is None  # nobody serves it: no promise
    assert eta_s(Batch("b", left), workers=2) is None  # nothing rendered yet: no pace to go by
    assert eta_s(Batch("b", done), workers=2) == 0.0
    assert [format_duration(s) for s in (45, 200, 7500)] == ["45s", "3m20s", "2h05m"]


def test_the_final_table_fits_80_columns_and_says_once_where_the_videos_are():
    entries = [
        ManifestEntry(key=f"{n:x}" * 64, status=JobStatus.DONE, id=f"cat-{n}", lora_scale=0.5, seed=n,
                      video=f"s3://team-bucket/lorafleet/videos/{f'{n:x}' * 64}.mp4")
        for n in range(1, 4)
    ] + [ManifestEntry(key="e" * 64, status=JobStatus.FAILED, id="dog", error="CUDA out of memory")]  # fmt: skip
    out = io.StringIO()
    print_summary(Batch("night", entries), Console(file=out, force_terminal=True, width=80, color_system=None))
    lines = out.getvalue().splitlines()
    assert len(lines) <= 4 + len(entries) + 3, "\n".join(lines)  # a row a job: nothing folded
    assert "videos: s3://team-bucket/lorafleet/videos/KEY.mp4" in out.getvalue()
    assert "lorafleet status night --json" in out.getvalue()
    assert any("dog" in line and "CUDA out of memory" in line for line in lines)


def test_a_manifest_reads_back_as_written_whatever_its_text_holds(tmp_path):
    """Lines are written by pydantic's serializer (UTF-8 as it is); an error with a lone surrogate
    (a worker's message can carry one) goes through the json module's escape, and the line stays."""
    from common.store import Store
    from tests.helpers import planted_job

    store = Store(str(tmp_path))
    entries = [
        ManifestEntry(key="ab" * 32, status=JobStatus.FAILED, id="chat é 猫", lora_scale=1e-07, seed=2**70, error="x\u2028y"),
        ManifestEntry(key="cd" * 32, status=JobStatus.FAILED, id="j2", error="half a pair \udc80"),
        ManifestEntry(key="ef" * 32, status=JobStatus.DONE, worker="w1", seconds=1.5),
    ]
    batch = Batch("b", entries)
    batch.write_manifest(store)
    assert Batch.load(store, "b").entries == entries
    # and the batch's jobs, which `lorafleet retry` reads back
    jobs = [planted_job("ab" * 32).model_copy(update={"prompt": "a cat\u2028a dog\x85"}), planted_job("cd" * 32)]
    batch.write_jobs(store, jobs)
    assert list(batch.read_jobs(store).values()) == jobs
