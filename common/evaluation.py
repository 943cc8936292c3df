"""What a video is judged by: the numbers of `videos/<key>.eval.json` and the ones between two videos.

Per key, computed once by a worker (`lorafleet.evaluate`, workers/evaluator.py) and kept in the
store beside the video: CLIPScore of the prompt, CLIP frame-to-frame consistency and temporal
SSIM. An eval.json is reused while the evaluator that wrote it is the one configured now
(`evaluator_identity`: this module's version and the CLIP model); otherwise it is computed again.
Between a cell and its lora_scale-0 cell the report computes SSIM and PSNR (numpy only, no torch).
"""

import tempfile
from collections.abc import Iterator
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import EvaluationError
from common.settings import Settings
from common.store import Store, video_path

EVAL_VERSION = 1  # raise when a per-key number is computed differently: every eval.json is redone
EVAL_FRAMES = 8  # frames CLIP looks at, evenly spaced over the video
SSIM_WINDOW = 7


def video_frames(store: Store, key: str, max_pixels: int) -> Iterator[np.ndarray]:
    """A stored video's frames, decoded one at a time, as (height, width, 3) uint8; raises
    EvaluationError once frames × height × width passes `max_pixels` (LORAFLEET_MAX_VIDEO_PIXELS,
    what a render may make: a planted 18 KB MP4 can hold 300 frames of 1024²), or with one line
    saying why a video does not decode."""
    import imageio.v3 as iio

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(store.read_bytes(video_path(key, "mp4")))
        f.flush()
        pixels = 0
        try:
            for frame in iio.imiter(f.name, plugin="FFMPEG"):
                pixels += frame.shape[0] * frame.shape[1]
                if pixels > max_pixels:
                    raise EvaluationError(
                        f"{key[:12]}: the video holds more than {max_pixels:,} pixels (LORAFLEET_MAX_VIDEO_PIXELS): "
                        "not a render of this fleet"
                    )
                yield frame
        except EvaluationError:
            raise
        except Exception as exc:  # ffmpeg's whole banner is no reason: its last line is
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise EvaluationError(f"{key[:12]}: the video does not decode: {(lines or ['?'])[-1][:200]}") from None


def read_video(store: Store, key: str, max_pixels: int) -> np.ndarray:
    """A stored video's frames as (frames, height, width, 3) uint8, bounded as `video_frames` says."""
    return np.stack(list(video_frames(store, key, max_pixels)))


def eval_path(key: str) -> str:
    """Where a key's evaluation lives in the store."""
    return f"videos/{key}.eval.json"


class Evaluation(BaseModel):
    """A key's eval.json: who computed it (`evaluator_identity`), its numbers (by the report's
    METRICS names, each finite), and, from a worker, the frames it read and how long it took."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    key: str
    evaluator: dict[str, Any]
    numbers: dict[str, Annotated[float, Field(allow_inf_nan=False)]]
    frames: int | None = None
    sampled_frames: int | None = None
    seconds: float | None = None


def write_evaluation(store: Store, evaluation: Evaluation) -> None:
    store.write_bytes(eval_path(evaluation.key), evaluation.model_dump_json(indent=1, exclude_none=True).encode())


def read_evaluation(store: Store, key: str) -> Evaluation | None:
    """A key's evaluation, or None where there is none, or what is there is not one lorafleet wrote
    for this key (anyone who can write the store can write it): then it is computed again."""
    try:
        evaluation = Evaluation.model_validate_json(store.read_bytes(eval_path(key)))
    except (FileNotFoundError, ValidationError):
        return None
    return evaluation if evaluation.key == key else None


def evaluator_identity(settings: Settings) -> dict:
    """What decides a key's numbers besides its video: an eval.json by another evaluator is redone."""
    return {"version": EVAL_VERSION, "clip": settings.eval_clip}


def sample_indices(frames: int, count: int = EVAL_FRAMES) -> list[int]:
    """`count` frame indices evenly spaced from the first frame to the last (all, if fewer)."""
    if frames <= count:
        return list(range(frames))
    return [round(i * (frames - 1) / (count - 1)) for i in range(count)]


def _box(image: np.ndarray, size: int) -> np.ndarray:
    """Mean over every size×size window ("valid" positions only), through summed-area tables."""
    table = np.pad(image.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return (table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]) / size**2


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two RGB frames (on luma, 7×7 windows, the usual constants)."""
    weights = np.array([0.299, 0.587, 0.114])
    x, y = (frame.astype(np.float64) @ weights for frame in (a, b))
    size = min(SSIM_WINDOW, *x.shape)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _box(x, size), _box(y, size)
    vx, vy, cxy = _box(x * x, size) - mx**2, _box(y * y, size) - my**2, _box(x * y, size) - mx * my
    return float(np.mean(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))))


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """Peak signal-to-noise ratio in dB; None for identical videos (infinite, and JSON has no infinity)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return None if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def temporal_ssim(video) -> float:
    """Mean SSIM of consecutive frames (any iterable of them, read once): 1 for a still video,
    lower for flicker and jumps."""
    values, last = [], None
    for frame in video:
        if last is not None:
            values.append(ssim(last, frame))
        last = frame
    return float(np.mean(values)) if values else 1.0


def vs_base(video: np.ndarray, base: np.ndarray) -> dict:
    """How far a cell moved from its lora_scale-0 cell: mean SSIM and PSNR of its frames."""
    return {
        "ssim_vs_base": float(np.mean([ssim(f, g) for f, g in zip(video, base, strict=True)])),
        "psnr_vs_base": psnr(video, base),
    }


def clip_numbers(text_embedding: np.ndarray, frame_embeddings: np.ndarray) -> dict:
    """CLIPScore (100 × the cosine of prompt and frame, floored at 0, averaged over the frames; as
    torchmetrics computes it) and frame consistency (mean cosine of consecutive frames)."""
    text = text_embedding / np.linalg.norm(text_embedding)
    frames = frame_embeddings / np.linalg.norm(frame_embeddings, axis=1, keepdims=True)
    score = float(np.mean(np.maximum(frames @ text, 0.0)) * 100)
    consistency = float(np.mean(np.sum(frames[:-1] * frames[1:], axis=1))) if len(frames) > 1 else 1.0
    return {"clip_score": score, "clip_consistency": consistency}
