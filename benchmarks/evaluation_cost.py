"""What evaluating a sweep's videos costs a worker: no CLIP, the tiny CLIP, and ("large") a CLIP of
ViT-L/14's size (openai/clip-vit-large-patch14's config, random weights: it times like the real one).

    python benchmarks/evaluation_cost.py                  # CPU; the demo sweep's 10 videos (12 cells)
    python benchmarks/evaluation_cost.py --clips none tiny   # a smoke run (the test suite's)
    python benchmarks/evaluation_cost.py --device cuda --frames 49 --height 480 --width 720

Renders the videos once with `lorafleet render` on the tiny model (their size is set here; the
evaluator decodes, samples 8 frames and resizes them to CLIP's input, whatever the model), then
times `workers/evaluator.py: Evaluator.evaluate` on each, as the `lorafleet.evaluate` task runs it,
including the CLIP model's load on first use.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.settings import Settings  # noqa: E402
from common.store import Store  # noqa: E402
from workers.evaluator import Evaluator  # noqa: E402
from workers.tiny_model import write_tiny_model  # noqa: E402

PROMPTS = ["a cat walks along the beach at sunset", "a dog runs across a green field"]


def write_vit_large_clip(folder: str, tokenizer_from: str) -> str:
    """A random-weight CLIP with openai/clip-vit-large-patch14's architecture, the tiny tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    config = CLIPConfig(
        text_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
        projection_dim=768,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(), tokenizer=CLIPTokenizer.from_pretrained(tokenizer_from)
    ).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--videos", type=int, default=10, help="videos to evaluate (the demo sweep: 10 keys)")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--clips", nargs="+", default=["none", "tiny", "large"], choices=["none", "tiny", "large"])
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="evaluation-cost-")
    paths = write_tiny_model(work)
    clips = {"none": None, "tiny": paths["clip"]}
    if "large" in args.clips:  # ViT-L/14's size
        clips["large"] = write_vit_large_clip(os.path.join(work, "clip-large"), paths["clip"])
    clips = {name: ref for name, ref in clips.items() if name in args.clips}

    jobs = os.path.join(work, "jobs.jsonl")
    with open(jobs, "w") as f:
        for i in range(args.videos):
            job = {
                "prompt": PROMPTS[i % 2],
                "seed": i,
                "steps": 2,
                "num_frames": args.frames,
                "height": args.height,
                "width": args.width,
            }
            f.write(json.dumps(job) + "\n")
    store_dir = os.path.join(work, "store")
    env = {**os.environ, "LORAFLEET_MODEL": paths["model"], "LORAFLEET_STORE_URL": store_dir}
    subprocess.run(
        [sys.executable, "-m", "lorafleet", "render", jobs, "--device", "cpu"], env=env, check=True, capture_output=True
    )
    store = Store(store_dir)
    keys = [
        name.removesuffix(".mp4")
        for name in sorted(os.listdir(os.path.join(store_dir, "videos")))
        if name.endswith(".mp4")
    ]

    print(f"\nevaluating {len(keys)} videos of {args.frames}×{args.height}×{args.width} on {args.device}\n")
    print("| CLIP | first video, with the model's load (s) | each later video (s) | all videos (s) |")
    print("|---|---|---|---|")
    for name, ref in clips.items():
        evaluator = Evaluator(Settings(eval_clip=ref), args.device)
        seconds = []
        for key in keys:
            started = time.perf_counter()
            evaluator.evaluate(store, key)
            seconds.append(time.perf_counter() - started)
        later = sum(seconds[1:]) / max(1, len(seconds) - 1)
        print(f"| {name} | {seconds[0]:.3f} | {later:.3f} | {sum(seconds):.2f} |")


if __name__ == "__main__":
    main()
