"""Renders a refining sweep needs against the full grid, on a planted metric curve.

A sweep's suggestion is decided by the report's own rule (producer/report/rules.py: `summarise`, the
paired rule, `refine_scale`); this script feeds that code a planted curve instead of videos, so it
counts renders without rendering: CLIPScore falls as 10·scale² below scale 0's (so the rule's
1.0 tolerance is crossed at scale 0.316), plus a per prompt × seed offset (which a paired comparison
cancels) and a little noise. The refining sweep starts from the spec's coarse grid and adds one
scale per round (`refine: {resolution: R}`); the full grid renders every multiple of R at once.

    python benchmarks/sweep_refinement.py                      # resolution 0.05, 4 prompts × 2 seeds
    python benchmarks/sweep_refinement.py --resolution 0.02 --pairs 12
"""

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.sweep_spec import SUGGEST, scale_range  # noqa: E402
from producer.report import ReportCell, refine_scale, summarise  # noqa: E402


def planted(scale: float, pair: int, rng: random.Random) -> dict:
    drop = 10 * scale**2
    return {"clip_score": 30 + pair * 0.7 - drop + rng.gauss(0, 0.05), "clip_consistency": 0.95, "temporal_ssim": 0.9}


def cells_at(scales, pairs: int, rng: random.Random) -> list[ReportCell]:
    return [
        ReportCell(
            set=0, prompt=pair, seed=1, lora_scale=x, adapters=[], numbers=planted(x, pair, rng), key=f"{pair}-{x}",
            prompt_text=f"prompt {pair}", status="done", worker="planted", evaluated=True,
        )  # fmt: skip
        for x in scales
        for pair in range(pairs)
    ]


def summary_of(cells: list[ReportCell]) -> dict:
    return summarise(0, cells, SUGGEST, clip=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="0:1:0.25", help="the refining sweep's first grid (lora_scales)")
    parser.add_argument("--resolution", type=float, default=0.05)
    parser.add_argument("--pairs", type=int, default=8, help="prompt × seed pairs per scale")
    args = parser.parse_args()
    rng = random.Random(0)
    cells = cells_at(scale_range(args.grid), args.pairs, rng)
    rounds = 0
    while (x := refine_scale(summary_of(cells), args.resolution)) is not None:
        rounds += 1
        cells += cells_at([x], args.pairs, rng)
    refined = summary_of(cells)
    full_scales = scale_range(f"0:1:{args.resolution}")
    full = summary_of(cells_at(full_scales, args.pairs, random.Random(0)))
    print(f"planted: the rule's CLIPScore tolerance is crossed at lora_scale {0.1**0.5:.3f}; {args.pairs} pairs a scale")
    print("| sweep | scales | renders | rounds | suggested |\n|---|---|---|---|---|")
    print(f"| full grid 0:1:{args.resolution:g} | {len(full_scales)} | {len(full_scales) * args.pairs} | 1 | {full['suggested']:g} |")
    print(
        f"| {args.grid} + refine (resolution {args.resolution:g}) | {len(refined['scales'])} | "
        f"{len(refined['scales']) * args.pairs} | {1 + rounds} | {refined['suggested']:g} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
