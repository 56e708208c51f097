"""Grow a trained pixel-codec Wan model (the toy lab's `toy` preset) deeper without changing what it computes.

Each old block is followed by copies of itself whose three output projections (self-attention,
cross-attention, feed-forward) are zero, so every new block adds nothing to the residual stream and
the grown model's output equals the source model's. Training then starts from the source model with
the new blocks' inputs already carrying useful features (function-preserving depth growth).

    python scripts/grow_model.py SRC.safetensors DST.safetensors --layers 12

The new file keeps SRC's model card with ``model.backbone.options.overrides.num_layers`` set, so
`biwm eval DST` and a finetune stage's ``init: DST`` (with the same override in its recipe) read it.
Written through a temporary name.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

# the output projections of a diffusers WanTransformerBlock: zero makes the block the identity
ZERO_SUFFIXES = ("attn1.to_out.0.weight", "attn1.to_out.0.bias", "attn2.to_out.0.weight",
                 "attn2.to_out.0.bias", "ffn.net.2.weight", "ffn.net.2.bias")
BLOCK = re.compile(r"^transformer\.blocks\.(\d+)\.(.+)$")


def grow(tensors: dict[str, torch.Tensor], layers: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """(grown tensors, the indices of the new blocks that are zero-output copies)."""
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    out = {}
    for key, value in tensors.items():
        m = BLOCK.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            out[key] = value
    n = len(blocks)
    if not n or sorted(blocks) != list(range(n)):
        raise SystemExit("source: no transformer.blocks.N tensors numbered 0..N-1: not a Wan BiWM model file")
    if layers < n:
        raise SystemExit(f"--layers: must be at least the source's {n} blocks, got {layers}")
    # spread the new blocks evenly: old block i is followed by extra // n copies, one more for the first extra % n
    extra = layers - n
    plan = [(i, copy) for i in range(n) for copy in [False] + [True] * (extra // n + (i < extra % n))]
    for new, (old, copy) in enumerate(plan):
        for name, value in blocks[old].items():
            out[f"transformer.blocks.{new}.{name}"] = (torch.zeros_like(value) if copy and name in ZERO_SUFFIXES
                                                       else value.clone())
    return out, [new for new, (_, copy) in enumerate(plan) if copy]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--layers", type=int, required=True, help="number of blocks of the grown model")
    args = ap.parse_args()

    from biwm.core.checkpoint import DIGEST_KEY, STORAGE_KEY, atomic_save_tensors, load_model_tensors, read_metadata
    from biwm.core.stages.common import CARD_KEY

    meta = {k: v for k, v in read_metadata(args.src, "model file").items() if k != DIGEST_KEY}
    if CARD_KEY not in meta:
        raise SystemExit(f"{args.src}: no model card in it (ship it with scripts/ship_model.py --recipe first)")
    card = json.loads(meta[CARD_KEY])
    options = card["model"]["backbone"]["options"]
    if options.get("preset") not in ("tiny", "toy"):
        raise SystemExit(f"{args.src}: only the pixel-codec presets (tiny, toy) can grow, not {options.get('preset')!r}")
    meta.pop(STORAGE_KEY, None)
    tensors, copies = grow(load_model_tensors(args.src), args.layers)
    options.setdefault("overrides", {})["num_layers"] = args.layers
    meta[CARD_KEY] = json.dumps(card, sort_keys=True)
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tensors, args.dst, meta)
    print(f"wrote {args.dst}: {args.layers} blocks; copies of old blocks (output projections zero) at {copies}")


if __name__ == "__main__":
    main()
