"""Adapter resolution and checks without torch, and the store's atomic, confined writes."""

import os
import shutil

import pytest

from common.adapters import WEIGHTS_NAME, candidate_urls, read_adapter
from common.errors import AdapterError, StoreError
from common.store import Store

pytestmark = pytest.mark.unit


def test_folder_file_and_store_relative_paths_resolve_to_one_hash(tmp_path, tiny):
    store = Store(str(tmp_path / "store"))
    shutil.copytree(tiny["style"], tmp_path / "store" / "adapters" / "style")
    by_folder, _ = read_adapter(tiny["style"], store)
    by_file, _ = read_adapter(os.path.join(tiny["style"], WEIGHTS_NAME), store)
    by_store, _ = read_adapter("adapters/style", store)
    by_url, _ = read_adapter("file://" + tiny["style"], store)
    assert by_folder.sha256 == by_file.sha256 == by_store.sha256 == by_url.sha256
    assert by_store.url == str(tmp_path / "store" / "adapters" / "style" / WEIGHTS_NAME)
    assert any(name.endswith("attn1.to_q.lora_A.weight") for name in by_folder.tensors)


def test_alpha_from_metadata(tiny):
    subject, _ = read_adapter(tiny["subject"], None)
    style, _ = read_adapter(tiny["style"], None)
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
        read_adapter(str(path), None)


def test_truncated_file_is_refused(tmp_path, tiny):
    data = open(os.path.join(tiny["style"], WEIGHTS_NAME), "rb").read()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(AdapterError, match="truncated"):
        read_adapter(str(path), None)


def test_hub_ids_are_candidates_after_local_and_store(tmp_path):
    urls = candidate_urls("someone/style-lora", Store(str(tmp_path)))
    assert urls[-1] == f"hf://someone/style-lora/{WEIGHTS_NAME}"
    assert urls[0] == os.path.abspath(f"someone/style-lora/{WEIGHTS_NAME}")


def test_store_writes_whole_files_and_stays_inside(tmp_path):
    store = Store(str(tmp_path / "store"))
    uri = store.write_bytes("videos/abc.json", b"{}")
    assert uri == str(tmp_path / "store" / "videos" / "abc.json")
    assert store.read_bytes("videos/abc.json") == b"{}"
    assert os.listdir(tmp_path / "store" / "videos") == ["abc.json"]  # no temporary file left behind
    for escape in ("../outside", "/etc/passwd", "videos/../../x", "a//b"):
        with pytest.raises(StoreError):
            store.write_bytes(escape, b"x")
