"""A key's evaluation (`lorafleet.evaluate`), on the worker, where the GPU is: decode its MP4, score
a fixed sample of frames with CLIP against the prompt its metadata records, and write
`videos/<key>.eval.json` (common/evaluation.py says what each number is)."""

import json
import logging
import time

import numpy as np
import torch

from common.errors import EvaluationError
from common.evaluation import (
    Evaluation,
    clip_numbers,
    evaluator_identity,
    sample_indices,
    temporal_ssim,
    video_frames,
    write_evaluation,
)
from common.settings import Settings
from common.store import Store, video_exists, video_path

log = logging.getLogger("lorafleet.evaluate")
MAX_METADATA_BYTES = 1 << 20


class Evaluator:
    """Scores videos with the CLIP model `LORAFLEET_EVAL_CLIP` names, loaded on first use (a
    worker that never evaluates never loads it); without one, only the numbers that need no model."""

    def __init__(self, settings: Settings, device: str):
        self.clip_ref = settings.eval_clip
        self.identity = evaluator_identity(settings)
        self.device = torch.device(device)
        self.max_pixels = settings.max_video_pixels
        self._clip = None

    def clip(self):
        if self._clip is None:
            from transformers import CLIPModel, CLIPProcessor

            started = time.perf_counter()
            try:
                model = CLIPModel.from_pretrained(self.clip_ref).to(self.device).eval()
                processor = CLIPProcessor.from_pretrained(self.clip_ref)
            except (OSError, ValueError) as exc:
                raise EvaluationError(f"LORAFLEET_EVAL_CLIP={self.clip_ref}: cannot load a CLIP model: {exc}") from None
            self._clip = model, processor
            log.info("CLIP %s loaded in %.1fs", self.clip_ref, time.perf_counter() - started)
        return self._clip

    @torch.no_grad()
    def score(self, frames: list[np.ndarray], prompt: str) -> dict:
        """The CLIP numbers of a video's sampled frames against its prompt."""
        model, processor = self.clip()
        sample = list(frames)
        inputs = processor(
            text=[prompt], images=sample, return_tensors="pt", padding=True, truncation=True, max_length=77
        ).to(self.device)
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        images = model.get_image_features(pixel_values=inputs["pixel_values"].to(model.dtype))
        return clip_numbers(_array(text)[0], _array(images))

    def evaluate(self, store: Store, key: str) -> dict:
        """Compute and store `key`'s eval.json; returns it."""
        if not video_exists(store, key):
            raise EvaluationError(f"{key[:12]}: no video in the store to evaluate")
        started = time.perf_counter()
        metadata = _read_metadata(store, key)
        # One pass over the frames, holding only the ones CLIP samples: which ones, from the
        # frame count the job asked for; a video with another count is not this job's render.
        expected = metadata["job"]["num_frames"]
        wanted, sampled, count = set(sample_indices(expected)), [], 0

        def frames():
            nonlocal count
            for index, frame in enumerate(video_frames(store, key, self.max_pixels)):
                count = index + 1
                if count > expected:
                    break
                if index in wanted:
                    sampled.append(frame)
                yield frame

        numbers = {"temporal_ssim": temporal_ssim(frames())}
        if count != expected:
            found = f"more than {expected}" if count > expected else str(count)
            raise EvaluationError(f"{key[:12]}: the video has {found} frames, its job asked for {expected}")
        if self.clip_ref:
            numbers |= self.score(sampled, metadata["job"]["prompt"])
        evaluation = Evaluation(
            key=key,
            evaluator=self.identity,
            frames=count,
            sampled_frames=len(sampled) if self.clip_ref else 0,
            numbers=numbers,
            seconds=round(time.perf_counter() - started, 3),
        )
        write_evaluation(store, evaluation)
        return evaluation.model_dump(exclude_none=True)


def _array(features) -> np.ndarray:
    # transformers 5 returns a model output here, 4.x a tensor
    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return tensor.float().cpu().numpy()


def _read_metadata(store: Store, key: str) -> dict:
    try:
        raw = store.read_bytes(video_path(key, "json"))
    except FileNotFoundError:
        raise EvaluationError(f"{key[:12]}: no metadata in the store") from None
    if len(raw) > MAX_METADATA_BYTES:
        raise EvaluationError(f"{key[:12]}: metadata larger than {MAX_METADATA_BYTES} bytes")
    try:
        metadata = json.loads(raw)
        prompt = metadata["job"]["prompt"]
    except (ValueError, KeyError, TypeError):
        raise EvaluationError(f"{key[:12]}: metadata holds no job prompt") from None
    if not isinstance(prompt, str):
        raise EvaluationError(f"{key[:12]}: metadata's prompt is not text")
    frames = metadata["job"].get("num_frames")
    if not isinstance(frames, int) or isinstance(frames, bool) or not 1 <= frames <= 10_000:
        raise EvaluationError(f"{key[:12]}: metadata's num_frames is not a frame count")
    return metadata
