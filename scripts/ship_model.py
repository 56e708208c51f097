"""Make a model file fit to ship in the repository: its tensors in bfloat16 (half the size), its model
card kept or, for a file saved without one (an EMA taken from a checkpoint), written from a recipe,
and a student's teacher path set relative to where it will live.

    python scripts/ship_model.py SRC.safetensors DST_DIR [--recipe RECIPE.yaml] [--teacher PATH] [--sampler S:C:H[:N]] [--int8]

--int8 stores the weight matrices as int8 with one scale per row (a quarter of float32, half of
bfloat16; biwm reads them back to float on load), for models that do not fit the repository's budget
in bfloat16.

Writes DST_DIR/model.safetensors (through a temporary name) with a fresh checksum.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path, help="folder to write model.safetensors into")
    ap.add_argument("--recipe", type=Path, help="recipe that made SRC, for a card when SRC has none")
    ap.add_argument("--teacher", type=Path, help="a student's teacher model file (stored relative to DST)")
    ap.add_argument("--sampler", help="a teacher's sampler for its card, STEPS:CFG:SHIFT[:HISTORY_SIGMA] (e.g. "
                                      "20:1.5:3, or 20:1.5:3:0.1 for history noised to 0.1), replacing the one "
                                      "its recipe gave")
    ap.add_argument("--int8", action="store_true", help="weight matrices as int8 with per-row scales (see above)")
    args = ap.parse_args()
    sampler = None
    if args.sampler is not None:
        try:
            parts = args.sampler.split(":")
            if len(parts) not in (3, 4):
                raise ValueError
            steps, cfg, shift, noise = (parts + ["0"])[:4]
            sampler = {"steps": int(steps), "shift": float(shift), "cfg_scale": float(cfg),
                       "history_sigma": float(noise)}
        except ValueError:
            raise SystemExit(f"--sampler: expected STEPS:CFG:SHIFT[:HISTORY_SIGMA] such as 20:1.5:3, "
                             f"got {args.sampler!r}") from None
        if (sampler["steps"] < 1 or sampler["shift"] <= 0 or sampler["cfg_scale"] < 0
                or not 0 <= sampler["history_sigma"] < 1):
            raise SystemExit(f"--sampler: steps must be >= 1, shift > 0, CFG >= 0 and history sigma in [0, 1), "
                             f"got {args.sampler!r}")

    from biwm.core.checkpoint import (DIGEST_KEY, STORAGE_KEY, atomic_save_tensors, load_model_tensors, quantize_int8,
                                      read_metadata)
    from biwm.core.stages.common import CARD_KEY

    meta = {k: v for k, v in read_metadata(args.src, "model file").items() if k != DIGEST_KEY}
    tensors = load_model_tensors(args.src)
    meta.pop(STORAGE_KEY, None)
    if CARD_KEY not in meta:
        if args.recipe is None:
            raise SystemExit(f"{args.src}: no model card in it; pass --recipe with the recipe that trained it")
        from biwm.core.recipe import load_recipe
        from biwm.core.runner import RunContext
        from biwm.core.stages.common import model_card

        recipe = load_recipe(args.recipe, [])
        meta.update({"stage": "finetune", **model_card(RunContext(recipe, Path(args.dst)), "finetune")})
    if sampler is not None:
        import json

        card = json.loads(meta[CARD_KEY])
        if (card.get("sampler") or {}).get("student"):
            raise SystemExit(f"--sampler: {args.src} is a distilled generator; it samples with its own steps")
        card["sampler"] = sampler
        meta[CARD_KEY] = json.dumps(card, sort_keys=True)
    if args.teacher is not None:
        meta["teacher"] = os.path.relpath(args.teacher.resolve(), args.dst.resolve())
    args.dst.mkdir(parents=True, exist_ok=True)
    out = args.dst / "model.safetensors"
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    if args.int8:
        tensors = quantize_int8(tensors)
        meta[STORAGE_KEY] = "int8 weight matrices, float32 scale per row; the rest bfloat16"
    atomic_save_tensors(tensors, out, meta)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {'int8 + bfloat16' if args.int8 else 'bfloat16'})")


if __name__ == "__main__":
    main()
