"""biwm data cache at a given size: N synthetic clips encoded with a backbone preset (random weights).

Writes a dataset of N random-texture clips of --frames frames at the preset's size (or --height /
--width), then times build_cache over it with the preset's VAE and text encoder; prints and writes
clips/s, peak device memory and cache bytes per clip. On a CPU, --preset tiny (the pixel codec).

  python benchmarks/data_cache.py --preset tiny --clips 8 --frames 17 --out runs/bench/data_cache
  python benchmarks/data_cache.py --preset wan2.1-t2v-1.3b --clips 32 --frames 81 --out docs/results/data_cache
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BACKBONES, SIZES, base_parser, environment, peak_memory_gb, reset_memory, synchronize, write_json  # noqa: E402


def synthetic_dataset(folder: Path, clips: int, frames: int, height: int, width: int) -> None:
    """A dataset folder as biwm data import writes it: smooth random frames, a straight walk."""
    from biwm.core.checkpoint import save_tensors
    from biwm.data.store import CLIPS, MANIFEST, ClipEntry, DatasetManifest

    (folder / CLIPS).mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    entries = []
    for index in range(clips):
        name = f"clip{index:04d}"
        coarse = torch.rand(frames, 3, max(1, height // 16), max(1, width // 16), generator=generator)
        video = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
        c2w = torch.eye(4).repeat(frames, 1, 1)
        c2w[:, 2, 3] = torch.arange(frames) * 0.1
        intrinsics = torch.tensor([[0.8 * width, 0, width / 2], [0, 0.8 * width, height / 2], [0, 0, 1.0]])
        save_tensors({"frames": (video * 255).round().to(torch.uint8), "c2w": c2w, "intrinsics": intrinsics,
                      "actions": torch.full((frames,), 9)}, folder / CLIPS / f"{name}.safetensors")
        entries.append(ClipEntry(name=name, frames=frames, fps=16.0, height=height, width=width,
                                 caption=f"a walk through room {index % 4}", video="synthetic", camera="synthetic"))
    manifest = DatasetManifest(format="poses", source="synthetic", fps=16.0, temporal_factor=4, move_step=0.15,
                               turn_step_deg=5.0, clips=entries)
    (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2))


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=17, help="video frames per clip (1 + 4k)")
    parser.add_argument("--clips-per-shard", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write OUT.json")
    args = parser.parse_args()
    from biwm.core.plugins import get_plugin_manager
    from biwm.data.cache import build_cache

    height, width = args.height or SIZES[args.preset][0], args.width or SIZES[args.preset][1]
    device = torch.device(args.device)
    family, preset = BACKBONES[args.preset]
    options = {"preset": preset, "dtype": args.dtype}
    if preset != "tiny":
        options["random_init"] = True
    with torch.device(device):
        backbone = get_plugin_manager().get("backbone", family).create(options)
    backbone.to(device)
    work = Path(tempfile.mkdtemp(prefix="biwm-data-cache-"))
    try:
        synthetic_dataset(work / "ds", args.clips, args.frames, height, width)
        reset_memory(device)
        started = time.perf_counter()
        folder = build_cache(work / "ds", backbone, json.dumps(options), clips_per_shard=args.clips_per_shard,
                             device=device)
        synchronize(device)
        seconds = time.perf_counter() - started
        cache_bytes = sum(p.stat().st_size for p in folder.iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"preset": args.preset, "height": height, "width": width, "frames": args.frames, "clips": args.clips,
              "dtype": args.dtype, "seconds": round(seconds, 3), "clips_per_s": args.clips / seconds,
              "peak_memory_gb": peak_memory_gb(device), "cache_bytes_per_clip": cache_bytes / args.clips,
              "environment": environment(device), "command": "python " + " ".join(sys.argv)}
    print(f"{args.preset} {width}x{height}, {args.frames} frames: {result['clips_per_s']:.3g} clips/s, peak memory "
          f"{result['peak_memory_gb'] if result['peak_memory_gb'] is not None else '-'} GB, "
          f"{result['cache_bytes_per_clip'] / 2**20:.3g} MiB per clip")
    if args.out:
        write_json(args.out.with_suffix(".json"), result)


if __name__ == "__main__":
    main()
