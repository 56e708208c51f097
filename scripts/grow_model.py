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
    """(grown tensors, for each new block index the old block it copies or -1 for an old block)."""
    old = sorted({int(m.group(1)) for k in tensors if (m := BLOCK.match(k))})
    if not old or old != list(range(len(old))):
        raise SystemExit("source: no transformer.blocks.N tensors numbered 0..N-1: not a Wan BiWM model file")
    if layers < len(old):
        raise SystemExit(f"--layers: must be at least the source's {len(old)} blocks, got {layers}")
    # spread the new blocks evenly: old block i is followed by copies[i] copies of itself
    extra = layers - len(old)
    copies = [extra // len(old) + (1 if i < extra % len(old) else 0) for i in range(len(old))]
    origin: list[int] = []
    for i, n in enumerate(copies):
        origin += [-1 - i] + [i] * n  # -1 - i marks old block i kept as is
    out = {k: v for k, v in tensors.items() if not BLOCK.match(k)}
    for new, src in enumerate(origin):
        block = -1 - src if src < 0 else src
        for key, value in tensors.items():
            m = BLOCK.match(key)
            if m and int(m.group(1)) == block:
                value = value.clone()
                if src >= 0 and m.group(2) in ZERO_SUFFIXES:
                    value.zero_()
                out[f"transformer.blocks.{new}.{m.group(2)}"] = value
    return out, [s if s >= 0 else -1 for s in origin]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--layers", type=int, required=True, help="number of blocks of the grown model")
    args = ap.parse_args()

    from biwm.core.checkpoint import DIGEST_KEY, STORAGE_KEY, atomic_save_tensors, dequantize_int8, load_tensors, read_metadata
    from biwm.core.stages.common import CARD_KEY

    meta = {k: v for k, v in read_metadata(args.src, "model file").items() if k != DIGEST_KEY}
    if CARD_KEY not in meta:
        raise SystemExit(f"{args.src}: no model card in it (ship it with scripts/ship_model.py --recipe first)")
    card = json.loads(meta[CARD_KEY])
    options = card["model"]["backbone"]["options"]
    if options.get("preset") not in ("tiny", "toy"):
        raise SystemExit(f"{args.src}: only the pixel-codec presets (tiny, toy) can grow, not {options.get('preset')!r}")
    meta.pop(STORAGE_KEY, None)
    tensors, origin = grow(dequantize_int8(load_tensors(args.src, "model file"), str(args.src)), args.layers)
    options.setdefault("overrides", {})["num_layers"] = args.layers
    meta[CARD_KEY] = json.dumps(card, sort_keys=True)
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tensors, args.dst, meta)
    print(f"wrote {args.dst}: {args.layers} blocks; copies of old blocks (output projections zero) at "
          f"{[i for i, s in enumerate(origin) if s >= 0]}")


if __name__ == "__main__":
    main()
