"""Interactive rollout speed at real size: a distilled generator (4 steps, no CFG) producing chunks
of 4 latent frames after a framepack history, decoded to uint8 frames in host memory, for ≥ 30 s
of video. Random weights (speed does not depend on them).

    python benchmarks/rollout.py --preset wan2.1-t2v-1.3b --out docs/results/gpu_rollout_h100
    python benchmarks/rollout.py --preset wan2.2-ti2v-5b --out docs/results/gpu_rollout_h100
    python benchmarks/rollout.py --preset hunyuanvideo-1.5-480p --out docs/results/gpu_rollout_h200
    python benchmarks/rollout.py --preset tiny --seconds 2 --out /tmp/rollout   # CPU smoke run

Each variant is a set of speed options (``biwm.core.speed``) given to a
``biwm.core.sampling.RolloutSession``, which converts the model, samples, decodes and times the parts
(its ``timings``); measured in the same process as the plain eager path:

- ``eager``: what ``biwm generate`` does: noise drawn on the host and copied over, each chunk
  decoded inline and copied to the host before the next starts, PyTorch's default attention.
- ``overlap``: noise drawn on the GPU, decode on a side stream overlapped with the next chunk's
  denoising, frames copied to pinned memory asynchronously: no host synchronisation in the loop
  (checked with ``torch.cuda.set_sync_debug_mode``).
- ``compile``: overlap + the fastest attention kernel of the eager comparison + transformer blocks
  compiled (one static graph per window shape).
- ``decoder``: compile + the VAE decoder with channels-last convolutions, compiled.
- ``cudagraphs``: decoder, with the blocks compiled in ``reduce-overhead`` mode (CUDA graphs).
- ``fp8``: overlap + the fastest attention kernel + FP8 linears through torchao (biwm-quant's
  ``fp8`` quantizer), blocks not compiled: compiling the FP8 blocks for every window shape did not fit a
  10-minute device run (BENCHMARKS.md).
- ``fp8-compile``: ``fp8`` with the transformer blocks compiled (one static graph per window shape), so
  inductor fuses the activations' FP8 quantisation into the neighbouring kernels.
- ``nvfp4``: overlap + the fastest attention kernel + NVFP4 weight-only linears through torchao
  (biwm-quant's ``nvfp4`` quantizer, ``w4a16``: 4-bit weights dequantised for each product, on any
  device): less weight memory, no NVFP4 GEMM.

The quantised variants emulate where their GEMMs are missing (a CPU: FP8 numerics in the layer's dtype,
with a warning); a variant that cannot run (biwm-quant or torchao missing) is a row with the error,
as any failure on a GPU is.

For every variant: first-chunk latency (start to the first chunk's frames on the host), FPS
sustained over the whole rollout (frames / wall time), and per part the isolated time of one
steady-state chunk: DiT (the 4 denoising forwards), decode (VAE to uint8), other (the rest of the
rollout's wall time per chunk; negative when decode overlaps the DiT). DiT MFU divides FLOPs
counted by torch's FlopCounterMode by the DiT time and the bf16 GEMM peak measured in the same run.
``weight_bytes``: the transformer's weights as stored after the variant's conversion
(``biwm.quant.weight_bytes``: packed NVFP4 or FP8 tensors at their real size, scales included).
PREFIX.json keeps one entry per preset (a second run with another preset is merged in); the
top-level summary is Wan2.1-1.3B's when present.
"""

from __future__ import annotations

import gc
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (SIZES, Timer, base_parser, build_world, count_flops, environment,  # noqa: E402
                     gemm_peak_tflops, keyboard_camera, latent_grid, markdown_table, median, parse_list,
                     peak_memory_gb, reset_memory, synchronize, write_json)

VARIANTS = {
    "eager": {"overlap_decode": False},
    "overlap": {},
    "compile": {"attention": "fastest", "compile": True},
    "decoder": {"attention": "fastest", "compile": True, "compile_decoder": True, "channels_last_decoder": True},
    "cudagraphs": {"attention": "fastest", "compile": True, "compile_mode": "reduce-overhead",
                   "compile_decoder": True, "channels_last_decoder": True},
    "fp8": {"attention": "fastest", "quantize": {"name": "fp8"}},
    "fp8-compile": {"attention": "fastest", "compile": True, "quantize": {"name": "fp8"}},
    "nvfp4": {"attention": "fastest", "quantize": {"name": "nvfp4"}},
}
LADDER = list(VARIANTS)
GOAL = {"fps_sustained": 30.0, "first_chunk_s": 0.5}  # issue 6, for Wan2.1-1.3B at 832x480 on one H100


def speed_options(variant: str, attention: str):
    """The SpeedOptions of ``variant``; ``attention``: the fastest kernel of the eager comparison."""
    from biwm.core.speed import SpeedOptions

    options = {"overlap_decode": True, **VARIANTS[variant]}
    if options.get("attention") == "fastest":
        options["attention"] = attention
    return SpeedOptions(**options)


class Setup:
    """Shapes of one benchmark: preset, frame size, chunks for the requested seconds of video."""

    def __init__(self, args, world):
        self.preset = args.preset
        self.height, self.width, self.fps = args.height, args.width, args.fps
        bb = world.backbone
        self.hw = latent_grid(world, self.height, self.width)
        self.k = args.chunk_frames
        self.tf = bb.temporal_factor
        first = 1 + self.tf * (self.k - 1) if self.tf > 1 else self.k  # a causal VAE's first latent frame is 1 frame
        per_chunk = self.k * self.tf
        self.chunks = max(1, math.ceil((args.seconds * self.fps - first) / per_chunk) + 1)
        self.frames = first + per_chunk * (self.chunks - 1)
        self.steps = args.steps
        ph, pw = bb.patch_size[1:]
        self.tokens_per_frame = (self.hw[0] // ph) * (self.hw[1] // pw)
        # the window stops growing once the compressor's budget is full: warm up past that point
        budget = [world.compressor.token_budget(c * self.k, (self.hw[0] // ph, self.hw[1] // pw))
                  for c in range(self.chunks + 1)]
        self.steady_chunk = next((c for c in range(self.chunks) if budget[c] == budget[c + 1]), self.chunks - 1)
        self.history_tokens = budget[self.steady_chunk]
        self.warmup_chunks = min(self.chunks, self.steady_chunk + 2)
        self.history = f"framepack {[list(level) for level in world.compressor.layout]}"

    def describe(self) -> dict[str, Any]:
        return {"preset": self.preset, "height": self.height, "width": self.width, "video_fps": self.fps,
                "chunk_latent_frames": self.k, "denoising_steps": self.steps, "chunks": self.chunks,
                "frames": self.frames, "seconds_of_video": round(self.frames / self.fps, 2),
                "chunk_tokens": self.k * self.tokens_per_frame, "history_tokens_steady": self.history_tokens,
                "steady_from_chunk": self.steady_chunk + 1, "history": self.history,
                "cfg": "none (distilled)"}


def run_variant(variant: str, args, device: torch.device, attention: str, peak: float, flops: float,
                decode_flops: float) -> tuple[dict[str, Any], dict[str, Any]]:
    from biwm.core.sampling import RolloutSession, Sampler
    from biwm.core.speed import elapsed
    from biwm.core.stages.distill import DistillConfig

    options = speed_options(variant, attention)
    reset_memory(device)
    world = build_world(args.preset, device, args.dtype, inference=True).eval().requires_grad_(False)
    setup = Setup(args, world)
    started = time.perf_counter()
    bb = world.backbone
    text = bb.encode_text(["a walk through a house"]).to(device)
    null = bb.encode_text([""]).to(device)
    sampler = Sampler(setup.steps, DistillConfig.model_fields["student_shift"].default, student=True)  # distill's
    per_chunk = setup.k * setup.tf

    def session(history_chunks: int, chunks: int, overlap: bool = options.overlap_decode,
                host_noise: bool = not options.overlap_decode):
        """A session on ``history_chunks`` chunks of random history (the timed rollout starts from none),
        decoding to uint8 frames on the host and keeping timings, and the camera of its next ``chunks``
        chunks. ``host_noise``: drawn on the host and copied over, as biwm generate draws it (eager)."""
        camera = keyboard_camera((history_chunks + chunks) * setup.k, setup.tf, setup.width / setup.height, device)
        history = torch.randn(1, bb.latent_channels, history_chunks * setup.k, *setup.hw, device=device)
        generator = torch.Generator("cpu" if host_noise else device).manual_seed(0)
        h_video = history_chunks * per_chunk
        opened = RolloutSession(world, text, null, history, sampler, camera.frames(slice(0, h_video)), generator,
                                chunk_frames=setup.k, speed=options.model_copy(update={"overlap_decode": overlap}),
                                decode=True, timing=True)
        return opened, camera.frames(slice(h_video, None))

    with torch.no_grad():
        # warm-up, untimed: converts the model and compiles every window shape the rollout meets; twice,
        # because a decoder graph break on some torch versions (2.11) leaves pieces that compile only on
        # the next rollout
        for _ in range(2 if options.compile_decoder else 1):
            warm, camera = session(0, setup.warmup_chunks)
            warm.run(setup.warmup_chunks, camera)
            warm.finish()
        synchronize(device)
        warmup_s = time.perf_counter() - started
        weights = transformer_bytes(world)  # converted by the warm-up session
        reset_memory(device)

        # the timed rollout
        rolling, camera = session(0, setup.chunks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            watch_syncs = device.type == "cuda" and options.overlap_decode
            if watch_syncs:
                torch.cuda.set_sync_debug_mode("warn")
            t0 = time.perf_counter()
            try:
                rolling.run(setup.chunks, camera)
            finally:
                if watch_syncs:
                    torch.cuda.set_sync_debug_mode("default")
        frames = rolling.finish()
        synchronize(device)
        wall = time.perf_counter() - t0
        # the debug mode's own notice ("...is a prototype feature...") is not a synchronisation
        syncs = [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]
        first_chunk_s = elapsed(rolling.timings[0].start, rolling.timings[0].ready)
        n_frames = sum(f.shape[1] for f in frames)
        if n_frames != setup.frames:
            raise RuntimeError(f"{variant}: decoded {n_frames} frames, expected {setup.frames}")
        peak_gb = peak_memory_gb(device)
        dit_rollout = sum(elapsed(a, b) for t in rolling.timings for a, b in t.forwards)
        inline = not options.overlap_decode
        decode_rollout = sum(elapsed(*t.decode) for t in rolling.timings)

        # isolated parts of steady-state chunks, decoded inline: the DiT's 4 forwards, then the decode to
        # uint8 frames on the host
        steady, camera = session(setup.steady_chunk, args.repeats + 1, overlap=False, host_noise=False)
        steady.run(args.repeats, camera)
        dit_s = median([elapsed(*t.sample) for t in steady.timings])
        decode_s = median([elapsed(t.decode[0], t.ready) for t in steady.timings])

        profile = None
        if variant in args.profile:
            profile = profile_chunk(steady, camera.frames(slice(args.repeats * per_chunk, None)), device)

    chunks = setup.chunks
    fps = setup.frames / wall
    result = {
        "options": options.describe(),
        "fps_sustained": fps,
        "first_chunk_s": first_chunk_s,
        "wall_s": wall,
        "sec_per_chunk": wall / chunks,
        "dit_chunk_s": dit_s,
        "decode_chunk_s": decode_s,
        "other_chunk_s": wall / chunks - dit_s - decode_s,
        # shares of the rollout's wall time, only meaningful when nothing overlaps
        "dit_share_of_rollout": dit_rollout / wall if inline else None,
        "decode_share_of_rollout": decode_rollout / wall if inline else None,
        "dit_tflop_per_chunk": flops / 1e12,
        "dit_tflops": flops / dit_s / 1e12,
        "dit_mfu": flops / dit_s / 1e12 / peak,
        "decode_mfu": decode_flops / decode_s / 1e12 / peak,
        "peak_gb": peak_gb,
        "weight_bytes": weights,
        "host_syncs_in_loop": len(syncs) if watch_syncs else None,
        "host_sync_examples": sorted(set(syncs))[:5],
        "warmup_and_compile_s": warmup_s,
    }
    if profile is not None:
        result["profile"] = profile
    del world, warm, rolling, steady, frames
    gc.collect()
    if options.compile or options.compile_decoder:
        torch._dynamo.reset()
    reset_memory(device)
    return setup.describe(), result


def transformer_bytes(world) -> int | None:
    """Bytes of the transformer's weights as stored (None without biwm-quant, which counts them)."""
    try:
        from biwm.quant import weight_bytes
    except ImportError:
        return None
    return weight_bytes(world.backbone.trainable())


def profile_chunk(session, camera, device: torch.device) -> dict[str, Any] | None:
    """GPU time of one more steady-state chunk of ``session`` (denoise + decode to frames on the host,
    inline) by kernel class, from torch.profiler, and the share of the chunk's wall time the GPU
    spent in kernels: the most that removing launch gaps (CUDA graphs) could save is the rest."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with Timer(device) as wall:
            session.step(camera)
        torch.cuda.synchronize()
    classes: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
        if us <= 0:
            continue
        kernels.append((evt.key, us))
        classes[kernel_class(evt.key)] = classes.get(kernel_class(evt.key), 0.0) + us / 1000
    kernels.sort(key=lambda kv: -kv[1])
    busy_ms = sum(classes.values())
    return {"wall_ms": round(wall.seconds() * 1000, 2), "kernel_ms": round(busy_ms, 2),
            "gpu_busy_fraction": round(busy_ms / (wall.seconds() * 1000), 4),
            "ms_by_class": {k: round(v, 2) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [[name[:90], round(us / 1000, 2)] for name, us in kernels[:12]]}


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(s in n for s in ("conv", "implicit_gemm", "winograd", "dgrad", "wgrad", "fprop")):
        return "convolution"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "matmul", "scaled_mm")):
        return "gemm"
    if "memcpy" in n or "memset" in n:
        return "copy"
    if "triton" in n:
        return "fused (triton)"
    return "elementwise / norm / other"


def attention_comparison(args, device: torch.device) -> dict[str, Any]:
    """One steady-state DiT forward per scaled_dot_product_attention kernel (eager, bf16), and the
    FLOPs of a steady-state chunk (its denoising forwards), the same for every variant."""
    from biwm.core.speed import set_attention
    from biwm.core.window import Window

    world = build_world(args.preset, device, args.dtype, inference=True).eval().requires_grad_(False)
    setup = Setup(args, world)
    bb = world.backbone
    c = bb.latent_channels
    camera = keyboard_camera((setup.steady_chunk + 1) * setup.k, setup.tf, setup.width / setup.height, device)
    window = Window(text=bb.encode_text(["x"]).to(device), chunk=torch.randn(1, c, setup.k, *setup.hw, device=device),
                    timestep=torch.full((1,), 500.0, device=device),
                    history=torch.randn(1, c, setup.steady_chunk * setup.k, *setup.hw, device=device), camera=camera)
    out: dict[str, Any] = {}
    kernels = ["auto", "flash", "cudnn", "efficient"] if device.type == "cuda" else ["auto", "math"]
    with torch.no_grad():
        for name in kernels:
            try:
                set_attention(world, name)
                world(window)
                times = []
                for _ in range(args.repeats):
                    with Timer(device) as t:
                        world(window)
                    times.append(t.seconds())
                out[name] = median(times)
            except (RuntimeError, ValueError) as e:  # a kernel that does not support these shapes, dtype or mask
                # (diffusers raises ValueError for flash with an attention mask: HunyuanVideo-1.5's text mask)
                out[name] = None
                print(f"attention {name}: not available ({str(e).splitlines()[0][:100]})", file=sys.stderr)
        set_attention(world, "auto")
        flops = count_flops(lambda: world(window)) * args.steps
        decoder = bb.stream_decoder()
        decoder.decode(window.chunk)  # past the first chunk, whose first latent frame is a single frame
        decode_flops = count_flops(lambda: decoder.decode(window.chunk))
    del world
    reset_memory(device)
    usable = {k: v for k, v in out.items() if v is not None and k != "auto"}
    best = min(usable, key=usable.get) if usable else "auto"
    return {"forward_s": out, "fastest": best, "dit_tflop_per_chunk": flops / 1e12,
            "decode_tflop_per_chunk": decode_flops / 1e12}


def summary_rows(model: dict[str, Any]) -> list[list[Any]]:
    base = model["variants"].get("eager", {}).get("fps_sustained")
    rows = []
    for name, r in model["variants"].items():
        if "error" in r:
            rows.append([name, f"failed: {r['error'][:60]}"] + [None] * (len(HEADER) - 2))
            continue
        mb = r.get("weight_bytes")
        rows.append([name, r["fps_sustained"], r["fps_sustained"] / base if base else None, r["first_chunk_s"],
                     r["dit_chunk_s"] * 1000, r["decode_chunk_s"] * 1000, r["other_chunk_s"] * 1000,
                     r["dit_mfu"], r["peak_gb"], None if mb is None else mb / 2**20, r["host_syncs_in_loop"]])
    return rows


HEADER = ["variant", "FPS", "× eager", "first chunk s", "DiT ms/chunk", "decode ms/chunk", "other ms/chunk",
          "DiT MFU", "peak GB", "weights MiB", "host syncs"]


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--fps", type=int, help="video frame rate (default: the release's)")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of video to generate (default 30)")
    parser.add_argument("--chunk-frames", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variants", default=",".join(LADDER),
                        help=f"comma-separated, from {','.join(LADDER)} (speed options, see above)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the isolated per-part timings")
    parser.add_argument("--profile", default="", metavar="VARIANTS",
                        help="comma-separated variants to break down with torch.profiler (CUDA only)")
    parser.add_argument("--out", type=Path, help="write PREFIX.json (merged with another preset's) and PREFIX.md")
    args = parser.parse_args(argv)
    args.variants = parse_list(parser, "--variants", args.variants, LADDER)
    args.profile = parse_list(parser, "--profile", args.profile, LADDER) if args.profile else []
    h, w, fps = SIZES[args.preset]
    args.height, args.width, args.fps = args.height or h, args.width or w, args.fps or fps
    if args.seconds <= 0 or args.chunk_frames < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--seconds, --chunk-frames, --steps and --repeats must be positive")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    peak = gemm_peak_tflops(device)
    print(f"{args.preset} at {args.width}x{args.height}: bf16 GEMM peak {peak:.4g} TFLOP/s", file=sys.stderr)
    attention = attention_comparison(args, device)
    print(f"attention kernels, one steady-state forward (s): {attention['forward_s']}", file=sys.stderr)
    variants: dict[str, Any] = {}
    model = {"setup": {}, "peak_bf16_tflops": peak, "attention": attention, "variants": variants}
    for variant in args.variants:
        print(f"variant {variant} ...", file=sys.stderr, flush=True)
        try:
            model["setup"], variants[variant] = run_variant(variant, args, device, attention["fastest"], peak,
                                                   attention["dit_tflop_per_chunk"] * 1e12,
                                                   attention["decode_tflop_per_chunk"] * 1e12)
        except Exception as e:  # one failing option must not lose the others' figures
            if device.type != "cuda" and "quantize" not in VARIANTS[variant]:
                raise  # the CPU smoke run: a failure of the plain paths is a bug
            variants[variant] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            torch._dynamo.reset()
            reset_memory(device)
        print(f"  {variants[variant]}", file=sys.stderr, flush=True)
        if args.out:  # after every variant, so a run cut short keeps what it measured
            merge_and_write(args, device, model)

    print(markdown_table(HEADER, summary_rows(model)))
    return 0


def merge_and_write(args, device: torch.device, model: dict[str, Any]) -> None:
    import json

    path = args.out.with_suffix(".json")
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("models", {})[args.preset] = {**model, "environment": environment(device),
                                                  "command": "python " + " ".join(sys.argv)}
    data.update(summary(data["models"]))
    write_json(path, data)
    lines = []
    for preset, m in data["models"].items():
        s = m["setup"]
        lines += [f"### {preset}, {s.get('width')}x{s.get('height')}, {m['environment']['device']}, "
                  f"{m['environment']['date']}", "", f"`{m['command']}`", "",
                  markdown_table(HEADER, summary_rows(m)), ""]
    from biwm.core.checkpoint import atomic_write_text

    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines))


def summary(models: dict[str, Any]) -> dict[str, Any]:
    """Top-level figures: the fastest variant of Wan2.1-1.3B (else the first preset) and its eager baseline."""
    preset = "wan2.1-t2v-1.3b" if "wan2.1-t2v-1.3b" in models else next(iter(models))
    m = models[preset]
    ok = {k: v for k, v in m["variants"].items() if "error" not in v}
    if not ok:
        return {}
    best = max(ok, key=lambda k: ok[k]["fps_sustained"])
    r = ok[best]
    return {"preset": preset, "device": m["environment"]["device"], "best_variant": best,
            "fps_sustained": r["fps_sustained"], "first_chunk_s": r["first_chunk_s"], "dit_mfu": r["dit_mfu"],
            "baseline_fps": ok.get("eager", {}).get("fps_sustained"),
            "speedup_vs_eager": r["fps_sustained"] / ok["eager"]["fps_sustained"] if "eager" in ok else None,
            "goal": {**GOAL, "met": r["fps_sustained"] >= GOAL["fps_sustained"]
                     and r["first_chunk_s"] <= GOAL["first_chunk_s"]}}


if __name__ == "__main__":
    sys.exit(main())
