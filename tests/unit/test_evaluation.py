"""A key's evaluation reads the stored MP4 under bounds (a planted one is refused before it costs
minutes and gigabytes), holds only the frames CLIP samples, and fails in one line."""

import json
import time

import imageio.v3 as iio
import numpy as np
import pytest

from common.errors import EvaluationError
from common.evaluation import ssim, temporal_ssim
from common.settings import Settings
from common.store import Store, video_path

pytestmark = [pytest.mark.unit, pytest.mark.torch]  # the worker's evaluator
KEY = "ab" * 32


def plant(tmp_path, frames: np.ndarray, num_frames: int) -> Store:
    store = Store(str(tmp_path / "store"))
    path = tmp_path / "planted.mp4"
    iio.imwrite(path, frames, plugin="FFMPEG", fps=8, codec="libx264", macro_block_size=1)
    store.write_bytes(video_path(KEY, "mp4"), path.read_bytes())
    store.write_bytes(video_path(KEY, "json"), json.dumps({"job": {"prompt": "a cat", "num_frames": num_frames}}).encode())
    return store


def evaluator(max_video_pixels: int = 100_000_000):
    from workers.evaluator import Evaluator

    return Evaluator(Settings(eval_clip=None, max_video_pixels=max_video_pixels), "cpu")


def test_a_video_past_the_pixel_bound_is_refused_without_decoding_it_all(tmp_path):
    rng = np.random.default_rng(0)
    store = plant(tmp_path, rng.integers(0, 255, (40, 128, 128, 3), dtype=np.uint8), num_frames=40)
    started = time.monotonic()
    with pytest.raises(EvaluationError, match=r"more than 100,000 pixels \(LORAFLEET_MAX_VIDEO_PIXELS\)"):
        evaluator(max_video_pixels=100_000).evaluate(store, KEY)  # 6 frames' worth
    assert time.monotonic() - started < 10


def test_a_video_with_more_frames_than_its_job_is_refused(tmp_path):
    frames = np.zeros((17, 32, 32, 3), np.uint8)
    with pytest.raises(EvaluationError, match="the video has more than 9 frames, its job asked for 9"):
        evaluator().evaluate(plant(tmp_path, frames, num_frames=9), KEY)


def test_a_corrupt_video_fails_in_one_line(tmp_path):
    store = plant(tmp_path, np.zeros((9, 32, 32, 3), np.uint8), num_frames=9)
    store.write_bytes(video_path(KEY, "mp4"), b"\0\0\0\x18ftypmp42" + b"\x13" * 4000)
    with pytest.raises(EvaluationError) as failed:
        evaluator().evaluate(store, KEY)
    reason = str(failed.value)
    assert reason.startswith(f"{KEY[:12]}: the video does not decode: ") and "\n" not in reason
    assert "ffmpeg version" not in reason and len(reason) < 300


def test_the_streamed_numbers_are_the_whole_videos():
    rng = np.random.default_rng(1)
    video = rng.integers(0, 255, (5, 24, 24, 3), dtype=np.uint8)
    expected = np.mean([ssim(f, g) for f, g in zip(video[:-1], video[1:], strict=True)])
    assert temporal_ssim(iter(video)) == pytest.approx(expected) and temporal_ssim(video[:1]) == 1.0


def test_a_good_video_is_evaluated(tmp_path):
    frames = np.repeat(np.linspace(0, 255, 9, dtype=np.uint8)[:, None, None, None], 32, axis=1)
    frames = np.broadcast_to(frames, (9, 32, 32, 3)).copy()
    result = evaluator().evaluate(plant(tmp_path, frames, num_frames=9), KEY)
    assert result["frames"] == 9 and 0 < result["numbers"]["temporal_ssim"] <= 1
