"""What benchmarks/rollout.py and benchmarks/train.py share: building a world model of a published
shape with random weights, a keyboard-driven camera, FLOP counting, the bf16 GEMM peak of the
device, timers that do not synchronise, and the record of the environment."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

# Frame size and video frame rate of each release (Wan2.1: 832x480 at 16 fps; Wan2.2-TI2V-5B: 1280x704 at 24 fps;
# HunyuanVideo-1.5 480p: 848x480, the diffusers pipeline's default 16:9 size for target size 640, at 24 fps, the
# release's 121 frames in 5 s; diffusers' example exports at 15; LTX-2.3: 768x512 at 24 fps, the diffusers
# LTX2Pipeline's defaults).
SIZES = {"tiny": (32, 32, 16), "wan2.1-t2v-1.3b": (480, 832, 16), "wan2.2-ti2v-5b": (704, 1280, 24),
         "hunyuan-tiny": (32, 32, 16), "hunyuanvideo-1.5-480p": (480, 848, 24),
         "ltx-tiny": (32, 32, 16), "ltx-2.3-22b": (512, 768, 24)}
# The backbone plugin and its preset behind each benchmark preset ("tiny" is Wan's).
BACKBONES = {"tiny": ("wan", "tiny"), "wan2.1-t2v-1.3b": ("wan", "wan2.1-t2v-1.3b"),
             "wan2.2-ti2v-5b": ("wan", "wan2.2-ti2v-5b"), "hunyuan-tiny": ("hunyuan", "tiny"),
             "hunyuanvideo-1.5-480p": ("hunyuan", "hunyuanvideo-1.5-480p"), "ltx-tiny": ("ltx", "tiny"),
             "ltx-2.3-22b": ("ltx", "ltx-2.3-22b")}
KEYS = "w*24,wd*16,d*12,wj*16,w*20,a*12,wl*12,s*8"  # a scripted keyboard session, repeated as needed


def build_world(preset: str, device: torch.device, dtype: str = "bfloat16", compressor: str = "framepack",
                gradient_checkpointing: bool = False, seed: int = 0, inference: bool = False):
    """The world model a recipe with this preset, the actions and plucker controls and
    ``compressor`` builds, with random weights, created directly on ``device``. ``inference``:
    controls and compressor in the backbone's precision too (training keeps them as the stages do)."""
    from biwm.core.plugins import get_plugin_manager
    from biwm.core.window import WorldModel

    pm = get_plugin_manager()
    torch.manual_seed(seed)
    name, backbone_preset = BACKBONES[preset]
    options = {"preset": backbone_preset, "dtype": dtype, "gradient_checkpointing": gradient_checkpointing}
    if backbone_preset != "tiny":
        options["random_init"] = True
    with torch.device(device):  # initialise the weights where they will live (seconds, not minutes, at 5B)
        backbone = pm.get("backbone", name).create(options)
        controls = {name: pm.get("control", name).create({}, backbone=backbone) for name in ("actions", "plucker")}
        comp = pm.get("compressor", compressor).create({}, backbone=backbone)
        world = WorldModel(backbone, controls, comp).to(device)
    if inference:
        world.controls.to(backbone.dtype)
        world.compressor.to(backbone.dtype)
    return world


def latent_grid(world, height: int, width: int) -> tuple[int, int]:
    s = world.backbone.spatial_factor
    token = s * max(world.backbone.patch_size[1:])  # pixels per token side
    if height % token or width % token:
        raise SystemExit(f"error: --height/--width must be multiples of {token} for this backbone")
    return height // s, width // s


def keyboard_camera(latent_frames: int, temporal_factor: int, aspect: float, device: torch.device, batch: int = 1):
    """A latent-aligned, video-rate camera track for ``latent_frames`` driven by ``KEYS``."""
    from biwm.core.camera import CameraTrack, actions_to_poses, default_intrinsics, parse_keys

    frames = latent_frames * temporal_factor
    keys = parse_keys(KEYS)
    actions = keys.repeat(frames // len(keys) + 1)[:frames].expand(batch, -1).contiguous()
    c2w = actions_to_poses(actions)
    return CameraTrack(c2w, default_intrinsics(70.0, aspect, batch), actions).to(device)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything ``fn`` runs (matmuls, convolutions, attention), by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def gemm_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Median TFLOP/s of an n x n x n bf16 matmul on random data (the MFU denominator, measured in
    the same process as the figures it divides)."""
    if device.type != "cuda":
        n = 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        with Timer(device) as t:
            a @ b
        times.append(t.seconds())
    return 2 * n**3 / statistics.median(times) / 1e12


class Timer:
    """Wall time of a block: CUDA events on a GPU (read later, no synchronisation inside the loop),
    perf_counter on the CPU. ``seconds()`` waits for the end event."""

    def __init__(self, device: torch.device, stream: torch.cuda.Stream | None = None):
        self.cuda = device.type == "cuda"
        self.stream = stream

    def __enter__(self) -> "Timer":
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record(self.stream)
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record(self.stream)
        else:
            self.t1 = time.perf_counter()

    def seconds(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1000
        return self.t1 - self.t0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def environment(device: torch.device) -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "diffusers": version("diffusers"),
        "torchao": version("torchao"),
        "biwm-core": version("biwm-core"),
    }


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    from biwm.core.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options both benchmarks take: model preset, frame size, precision, device."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b", choices=sorted(SIZES))
    parser.add_argument("--height", type=int, help="frame height (default: the release's)")
    parser.add_argument("--width", type=int, help="frame width (default: the release's)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def parse_list(parser: argparse.ArgumentParser, flag: str, text: str, allowed: list[str]) -> list[str]:
    """A comma-separated choice list, or a usage error (exit 2) naming the unknown entries."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in allowed]
    if unknown or not items:
        parser.error(f"{flag}: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(allowed)}")
    return items
