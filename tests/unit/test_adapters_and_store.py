"""Adapter resolution and checks without torch, and the store's atomic, confined writes."""

import os
import shutil
import time

import pytest

from common.adapters import WEIGHTS_NAME, candidate_urls, read_adapter
from common.errors import AdapterError, JobFileError, LorafleetError, StoreError
from common.jobs_file import load_jobs
from common.manifest import check_batch_name
from common.model import model_info
from common.store import Store
from tests.helpers import default_limits, default_policy, resolver_for

pytestmark = pytest.mark.unit


def test_folder_file_and_store_relative_paths_resolve_to_one_hash(tmp_path, tiny):
    store = Store(str(tmp_path / "store"))
    shutil.copytree(tiny["style"], tmp_path / "store" / "adapters" / "style")
    policy = default_policy(store=store.location)
    by_folder, _ = read_adapter(tiny["style"], policy)
    by_file, _ = read_adapter(os.path.join(tiny["style"], WEIGHTS_NAME), policy)
    by_store, _ = read_adapter("adapters/style", policy)
    by_url, _ = read_adapter("file://" + tiny["style"], policy)
    assert by_folder.sha256 == by_file.sha256 == by_store.sha256 == by_url.sha256
    assert by_store.url == str(tmp_path / "store" / "adapters" / "style" / WEIGHTS_NAME)
    assert any(name.endswith("attn1.to_q.lora_A.weight") for name in by_folder.tensors)


def test_alpha_from_metadata(tiny):
    subject, _ = read_adapter(tiny["subject"], default_policy())
    style, _ = read_adapter(tiny["style"], default_policy())
    assert subject.metadata_alpha() == 1.0
    assert style.metadata_alpha() is None


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a safetensors file"),
        (b"PK\x03\x04 this is a zip, as torch.save writes", "not a safetensors file"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", "header is not JSON"),
    ],
)
def test_non_safetensors_files_are_refused(tmp_path, content, message):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(content)
    with pytest.raises(AdapterError, match=message):
        read_adapter(str(path), default_policy())


def test_truncated_file_is_refused(tmp_path, tiny):
    data = open(os.path.join(tiny["style"], WEIGHTS_NAME), "rb").read()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(AdapterError, match="truncated"):
        read_adapter(str(path), default_policy())


def test_hub_ids_are_candidates_after_local_and_store(tmp_path):
    urls = candidate_urls("someone/style-lora", Store(str(tmp_path)).location)
    assert urls[-1] == f"hf://someone/style-lora/{WEIGHTS_NAME}"
    assert urls[0] == os.path.abspath(f"someone/style-lora/{WEIGHTS_NAME}")
    assert urls[2] == str(tmp_path / "someone" / "style-lora" / WEIGHTS_NAME)  # then in the store
    assert not [url for url in candidate_urls("../outside", str(tmp_path)) if str(tmp_path) in url]


def test_store_writes_whole_files_and_stays_inside(tmp_path):
    store = Store(str(tmp_path / "store"))
    uri = store.write_bytes("videos/abc.json", b"{}")
    assert uri == str(tmp_path / "store" / "videos" / "abc.json")
    assert store.read_bytes("videos/abc.json") == b"{}"
    assert os.listdir(tmp_path / "store" / "videos") == ["abc.json"]  # no temporary file left behind
    for escape in ("../outside", "/etc/passwd", "videos/../../x", "a//b"):
        with pytest.raises(StoreError):
            store.write_bytes(escape, b"x")


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    store = Store(str(tmp_path / "store"))
    (tmp_path / "store" / "videos" / "abc.json").mkdir(parents=True)  # the rename onto a folder fails
    with pytest.raises(StoreError):
        store.write_bytes("videos/abc.json", b"{}")
    assert os.listdir(tmp_path / "store" / "videos") == ["abc.json"]


def test_the_url_policy_refuses_outside_its_schemes_and_roots_without_reading(tmp_path, tiny):
    store = Store(str(tmp_path / "store"))
    shutil.copytree(tiny["style"], tmp_path / "store" / "adapters" / "style")
    inside = tmp_path / "allowed"
    shutil.copytree(tiny["style"], inside / "style")
    os.symlink(tiny["style"], inside / "escape")  # a link inside a root to a folder outside it
    policy = default_policy(roots=(str(inside),), store=store.location)
    assert read_adapter(str(inside / "style"), policy)[0].sha256
    assert read_adapter("adapters/style", policy)[0].sha256  # the store is always allowed
    for outside in (tiny["style"], str(inside / "escape"), "/etc/passwd", "/no/such/file", "http://127.0.0.1:9/a"):
        with pytest.raises(AdapterError, match="is outside the allowed locations"):
            read_adapter(outside, policy)
    # As fsspec opens them: a scheme in any case is that scheme; a chained URL opens its last part.
    for outside in ("FILE:///etc/passwd", "File:///dev/zero", "LOCAL:///etc/passwd", "file:///etc/passwd"):
        assert not policy.allows(outside), outside
    assert policy.allows(f"FILE://{inside}/style/{WEIGHTS_NAME}")
    s3_policy = default_policy(schemes=(), store=Store("s3://bucket/prefix").location)
    assert s3_policy.allows("s3://bucket/prefix/adapters/style.safetensors")  # the store, whatever the schemes
    for outside in ("s3://bucket/prefix/k::file:///etc/passwd", "s3://bucket/prefix/../other/k", "s3://bucket/prefixed/k"):
        assert not s3_policy.allows(outside), outside
    assert not default_policy().allows("s3://b/k::file:///etc/passwd") and default_policy().allows("S3://b/k")


def test_an_adapter_over_the_size_limit_is_not_read(tiny):
    with pytest.raises(AdapterError, match=r"is larger than 0 MiB \(LORAFLEET_MAX_ADAPTER_MB\): not read"):
        read_adapter(tiny["style"], default_policy(max_bytes=100))


def test_an_unreachable_hub_is_asked_once_briefly(monkeypatch):
    """Offline, the hub client retries for over 20 s; one short connection try answers instead."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    started = time.monotonic()
    for _ in range(3):
        with pytest.raises(AdapterError, match='adapter "someone/some-adapter" not found'):
            read_adapter("someone/some-adapter", default_policy())
    assert time.monotonic() - started < 6


def test_a_fifo_is_refused_at_submit_without_blocking(tmp_path, tiny):
    fifo = tmp_path / "adapter.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(AdapterError, match="is not a regular file"):
        read_adapter(str(fifo), default_policy())
    jobs = tmp_path / "jobs.jsonl"
    os.mkfifo(jobs)
    with pytest.raises(JobFileError, match="not a regular file"):
        load_jobs(str(jobs), lambda alias: model_info(tiny["model"]), resolver_for(), default_limits())


@pytest.mark.parametrize("name", ["a\nb", "\x1b[31mred", "x" * 10_000, "../up", "", ".hidden", 7])
def test_batch_names_are_plain_and_never_echoed_whole(name):
    with pytest.raises(LorafleetError) as refused:
        check_batch_name(name)
    assert len(str(refused.value)) < 200 and "\n" not in str(refused.value) and "\x1b" not in str(refused.value)


def test_videos_present_by_lookups_for_a_few_keys_and_one_listing_for_many(tmp_path):
    from common.store import LIST_ABOVE, Store, video_path, videos_present

    store = Store(str(tmp_path / "store"))
    done = [f"{i:064x}" for i in range(3)]
    for key in done:
        store.write_bytes(video_path(key, "mp4"), b"mp4")
    store.write_bytes(video_path(f"{9:064x}", "png"), b"a poster without its video: not done")
    many = done + [f"{i:064x}" for i in range(3, LIST_ABOVE + 10)]
    assert videos_present(store, many) == set(done)  # one listing of videos/
    assert videos_present(store, many[:5]) == set(done)  # a lookup each
    assert videos_present(Store(str(tmp_path / "empty")), many) == set()
