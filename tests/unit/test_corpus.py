"""Hostile input: every file under tests/corpus/ is refused with its expected one-line errors."""

import json
import os
from dataclasses import replace

import pytest

from common.errors import JobFileError
from common.jobs_file import load_jobs
from common.model import model_info
from common.store import Store
from tests.conftest import REPO
from tests.helpers import default_limits, resolver_for

pytestmark = pytest.mark.unit
CORPUS = os.path.join(REPO, "tests", "corpus")
TINY_CONFIG = os.path.join(REPO, "tests", "tiny_config")  # the tiny model's config files: no torch needed
EXPECTED = json.load(open(os.path.join(CORPUS, "expected.json")))


def errors_for(path: str, tmp_path, max_jobs: int = 100_000) -> list[str]:
    with pytest.raises(JobFileError) as raised:
        load_jobs(
            path,
            lambda alias: model_info(TINY_CONFIG),
            resolver_for(Store(str(tmp_path / "store"))),
            replace(default_limits(), max_jobs=max_jobs),
        )
    return raised.value.errors


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file_is_refused_with_its_errors(name, tmp_path, monkeypatch):
    monkeypatch.chdir(CORPUS)  # adapter paths in the corpus are relative to it
    errors = errors_for(name, tmp_path)
    for expected in EXPECTED[name]:
        assert any(expected in error for error in errors), (expected, errors)
    assert all("\n" not in error for error in errors)


def test_every_corpus_file_has_expectations():
    files = {f for f in os.listdir(CORPUS) if f.endswith(".jsonl")}
    assert files == set(EXPECTED)


def test_a_million_lines_stop_at_the_limit_with_one_error(tmp_path):
    path = tmp_path / "million.jsonl"
    line = json.dumps({"prompt": "a cat", "seed": 1}) + "\n"
    path.write_text(line * 1_000_000)
    errors = errors_for(str(path), tmp_path, max_jobs=1000)  # read as a stream: stopped at line 1001
    assert errors == ["line 1001: more than 1000 jobs in one file (LORAFLEET_MAX_JOBS): split it"]


def test_lists_that_expand_past_the_limit_are_refused(tmp_path):
    path = tmp_path / "sweep.jsonl"
    path.write_text(
        json.dumps({"prompt": "a cat", "lora_scale": [0.1 * i for i in range(30)], "seed": list(range(40))}) + "\n"
    )
    errors = errors_for(str(path), tmp_path, max_jobs=1000)
    assert errors == ["the file expands to 1200 jobs, more than 1000 (LORAFLEET_MAX_JOBS): split it"]
