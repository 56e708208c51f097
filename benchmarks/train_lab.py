"""Toy-lab training speed: steps per second of stage 1 on the toy world, the loop as it was before
issue 13 against the loop as it is, same model, batch and windows, measured in one run.

    python benchmarks/train_lab.py --out docs/results/train_lab_h200                # one GPU
    python benchmarks/train_lab.py --presets tiny --steps 4 --warmup 1 --batch 4 --out /tmp/lab  # CPU smoke run
    python benchmarks/train_lab.py --presets toy --variants resident --profile 10 --out OUT  # where the time goes

Variants (each adds to the one before):
- ``before``: the loop before issue 13: fp32, the training clips on the host (each window copied
  to the device), noise and dropout drawn on the host, ``loss.item()`` after every step (a host
  sync), unfused AdamW.
- ``resident``: clips resident on the device, noise drawn there from a device generator, the loss
  read every 100 steps instead of every step, fused AdamW (on CUDA).
- ``bf16``: plus bf16 autocast (fp32 master weights).
- ``compile``: ``resident`` (fp32) with the transformer blocks compiled (``compile: true`` in the
  stage: regional ``torch.compile``, the token count symbolic so every history length shares a graph).
- ``compile-bf16``: ``compile`` with bf16 autocast.
- ``world-bf16``: bf16 autocast with the world model's whole forward compiled (``compile_world`` with
  ``dynamic=True``): embeddings, controls, blocks and un-embedding fused by inductor, the history length
  symbolic (three graphs: no history, one frame, longer), all compiled before timing (their time is
  the warm-up column). On the H200's torch 2.11 this did not finish compiling in 10 minutes.
- ``world-bf16-graphs``: ``world-bf16`` with CUDA graphs (``mode="reduce-overhead"``): the forward
  and backward of each history length replay as one graph, no per-kernel launch cost.
- ``world-bf16-auto`` / ``-auto-graphs``: ``world-bf16`` with torch's automatic dynamic shapes
  (``dynamic=None``): only the sizes that change between windows (the history length) become symbolic.
- ``world-bf16-static`` / ``-static-graphs``: one static graph per history length (9), no symbolic
  shapes: the stage's ``compile: world`` and ``compile: world-graphs`` (CUDA graphs over it).
- ``world-bf16-cg``: the whole forward captured in CUDA graphs without inductor (``compile: graphs``:
  the ``cudagraphs`` backend, static shapes, one graph per history length; eager kernels, no per-kernel
  launch cost).

The same seeded window shapes (history length 0-8, chunk of 4) are used by every variant. Reported:
median seconds per step over ``--steps`` timed steps (in blocks of 25) after ``--warmup`` steps, and
the speed-up over ``before`` (over the median of its rows where ``--variants`` lists it more than once:
the host-bound ``before`` loop varies more between runs than the compiled ones).
"""

from __future__ import annotations

import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, median, parse_list, synchronize, write_json  # noqa: E402

VARIANTS = ["before", "resident", "bf16", "compile", "compile-bf16", "world-bf16", "world-bf16-graphs", "world-bf16-cg",
            "world-bf16-auto", "world-bf16-auto-graphs", "world-bf16-static", "world-bf16-static-graphs"]
BLOCK = 25


def build(preset: str, device: torch.device, clips: int, frames: int):
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext
    from biwm.core.stages.common import load_world_model

    recipe = validate_recipe({
        "name": "train-lab-bench", "run_dir": "/tmp/train-lab-bench",
        "data": {"train_clips": clips, "frames": frames, "toyworld": {"height": 32, "width": 32, "supersample": 4}},
        "model": {"backbone": {"name": "wan", "options": {"preset": preset}}, "controls": ["actions", "plucker"],
                  "compressor": {"name": "none", "options": {"max_frames": 8}}},
        "stages": [{"stage": "finetune"}]})
    ctx = RunContext(recipe=recipe, run_dir=Path("/tmp/train-lab-bench"))
    world = load_world_model(ctx).to(device)
    data = ctx.dataset.latents("train", clips, frames, world.backbone, None, "bench", device=device)
    return world, data


def forced_batch(data, cfg, h_len: int, device: torch.device):
    """A batch of the first clips with history length ``h_len`` (compiling each window shape)."""
    k, tf = cfg.chunk_frames, data.camera.num_frames // data.latents.shape[2]
    idx = torch.arange(cfg.batch_size, device=data.latents.device) % data.latents.shape[0]
    window = data.latents[idx, :, cfg.max_history - h_len:cfg.max_history + k].to(device)
    camera = data.camera.select(idx).frames(slice((cfg.max_history - h_len) * tf, (cfg.max_history + k) * tf))
    return (window[:, :, h_len:].contiguous(), window[:, :, :h_len].contiguous(),  # as sample_batch
            camera.to(device).contiguous())


def time_variant(variant: str, preset: str, device: torch.device, args) -> dict:
    from biwm.core.stages.common import text_embeddings
    from biwm.core.stages.finetune import FinetuneConfig, finetune_loss, make_optimizer, sample_batch

    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # each variant compiles from scratch, and counts its own graphs
    counters.clear()
    torch.manual_seed(0)
    world, data = build(preset, device, args.clips, args.frames)
    cfg = FinetuneConfig(batch_size=args.batch, max_history=args.max_history,
                         precision="bf16" if "bf16" in variant else "fp32")
    text, null = text_embeddings(world, "", args.batch, device)
    if variant != "before":
        data = data.to(device)
    optimizer = make_optimizer(world, cfg, fused=variant != "before" and device.type == "cuda")
    params = [p for p in world.parameters() if p.requires_grad]
    if variant.startswith("compile"):
        from biwm.core.speed import compile_blocks

        compile_blocks(world, dynamic=True)  # as the finetune stage does with compile: blocks
    elif variant.startswith("world"):
        from biwm.core.speed import compile_world

        options = ({"backend": "cudagraphs", "dynamic": False} if variant.endswith("cg")  # as compile: graphs
                   else {"dynamic": None} if "auto" in variant  # automatic dynamic: changed sizes only
                   else {"dynamic": False} if "static" in variant else {})  # a graph per history length
        compile_world(world, **options, **({"mode": "reduce-overhead"} if variant.endswith("graphs") else {}))
    shapes = torch.Generator().manual_seed(1)
    noise = torch.Generator() if variant == "before" else torch.Generator(device)
    world.train()
    pending: list[torch.Tensor] = []
    block_times: list[float] = []
    def train_step(step: int) -> torch.Tensor:
        noise.manual_seed(step)
        x0, history, camera = sample_batch(data, cfg, shapes, device)
        loss = finetune_loss(world, cfg, x0, history, camera, text, null, noise, "bidirectional")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    total = args.warmup + args.steps
    start = began = time.perf_counter()
    warmup_seconds = 0.0
    if variant.startswith("world"):  # compile every history length's graph before the timed steps
        for h_len in range(cfg.max_history + 1):
            for _ in range(3):  # CUDA graphs record on a shape's second or third call
                x0, history, camera = forced_batch(data, cfg, h_len, device)
                loss = finetune_loss(world, cfg, x0, history, camera, text, null, noise, "bidirectional")
                loss.backward()
                optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            print(f"{preset} {variant}: history {h_len} compiled, {counters['stats']['unique_graphs']} graphs, "
                  f"{time.perf_counter() - began:.0f} s", flush=True)
    for step in range(total):
        if step == args.warmup:
            synchronize(device)
            start = time.perf_counter()
            warmup_seconds = start - began  # includes compilation
        loss = train_step(step)
        if variant == "before":
            loss.item()
        else:
            pending.append(loss.detach())
            if len(pending) == 100:
                torch.stack(pending).tolist()
                pending.clear()
        done = step + 1 - args.warmup
        if done > 0 and done % BLOCK == 0 or step + 1 == total:
            synchronize(device)
            now = time.perf_counter()
            steps_in_block = BLOCK if done % BLOCK == 0 else done % BLOCK
            block_times.append((now - start) / steps_in_block)
            start = now
    profiled = {}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for step in range(total, total + args.profile):
                train_step(step)
            synchronize(device)
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda"
                                          else "self_cpu_time_total", row_limit=25, max_name_column_width=60)
        if device.type == "cuda":  # what the GPU itself spends: kernels launched and their time
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            profiled = {"kernels_per_step": len(kernels) / args.profile,
                        "kernel_ms_per_step": sum(e.self_device_time_total for e in kernels) / args.profile / 1e3}
            write_kernel_sources(prof, args.out.parent / f"{args.out.name}.{preset}.{variant}.kernels.txt")
        path = args.out.parent / f"{args.out.name}.{preset}.{variant}.profile.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{preset} {variant}, batch {args.batch}, {args.profile} steps: {profiled}\n{table}\n")
        print(f"{preset} {variant}: {profiled or 'CPU'}; table in {path}", flush=True)
    graphs = counters["stats"]["unique_graphs"] if variant.startswith(("compile", "world")) else None
    return {"variant": variant, "preset": preset, "seconds_per_step": median(block_times), **profiled,
            "compiled_graphs": graphs,
            "steps_per_second": 1 / median(block_times), "timed_steps": args.steps,
            "warmup_seconds": round(warmup_seconds, 1),
            "parameters_m": round(sum(p.numel() for p in params) / 1e6, 2)}


def write_kernel_sources(prof, path: Path, top: int = 6) -> None:
    """The generated source of the ``top`` inductor kernels by GPU time in ``prof`` (found by name in
    inductor's cache folder), so a slow kernel's tiling and sizes can be read after the machine is gone."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    slow = sorted((e for e in prof.key_averages() if e.key.startswith("triton_")),
                  key=lambda e: e.self_device_time_total, reverse=True)[:top]
    sources = list(Path(cache_dir()).rglob("*.py"))
    parts = []
    for event in slow:
        marker = f"def {event.key}("
        found = next((f for f in sources if marker in f.read_text(errors="replace")), None)
        text = found.read_text(errors="replace") if found else "(source not found in the inductor cache)"
        parts.append(f"# {event.key}: {event.count} calls, {event.self_device_time_total / 1e3:.2f} ms in all\n{text}")
    path.write_text("\n\n".join(parts))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,toy")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--clips", type=int, default=256, help="training clips rendered for the benchmark")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--max-history", type=int, default=8, help="most history latent frames of a window "
                        "(the lab's 8; world-bf16-cg records one CUDA graph per length 0..N)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile N more steps of each variant: OUT.PRESET.VARIANT.profile.txt "
                             "(torch.profiler table) and kernels / kernel ms per step in the JSON")
    parser.add_argument("--compile-cache", type=Path, metavar="FILE",
                        help="torch's portable compile cache (torch.compiler.save_cache_artifacts, zlib-compressed): loaded from FILE "
                             "before the first variant if it exists, written to FILE at the end, so a later run on a "
                             "fresh machine skips most of inductor's compile time (the warm-up column then shows it)")
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes OUT.json and OUT.md")
    args = parser.parse_args()
    presets = parse_list(parser, "--presets", args.presets, ["tiny", "toy"])
    variants = parse_list(parser, "--variants", args.variants, VARIANTS)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.compile_cache and args.compile_cache.is_file():
        info = torch.compiler.load_cache_artifacts(zlib.decompress(args.compile_cache.read_bytes()))
        print(f"compile cache loaded from {args.compile_cache}: {info}", flush=True)
    results = []
    args.out.parent.mkdir(parents=True, exist_ok=True)  # the JSON is written after every variant: a cut-off run keeps its rows

    def save() -> None:
        for preset in presets:  # against the median of the preset's `before` rows (a variant may be listed twice)
            befores = [r["seconds_per_step"] for r in results if r["preset"] == preset and r["variant"] == "before"
                       and "error" not in r]
            for r in results:
                if r["preset"] == preset and "error" not in r:
                    r["speedup_over_before"] = median(befores) / r["seconds_per_step"] if befores else None
        write_json(args.out.with_suffix(".json"), {"batch": args.batch, "environment": environment(device),
                                                   "results": results})

    for preset in presets:
        for variant in variants:
            try:
                r = time_variant(variant, preset, device, args)
            except Exception as exc:  # a variant that fails (e.g. does not compile) is a row, not the end of the run
                print(f"{preset} {variant}: failed: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
                results.append({"variant": variant, "preset": preset, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                save()
                continue
            results.append(r)
            print(f"{preset} {variant}: {r['seconds_per_step'] * 1e3:.1f} ms/step", flush=True)
            save()
    if args.compile_cache:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            tmp = args.compile_cache.with_name(args.compile_cache.name + ".tmp")
            tmp.write_bytes(zlib.compress(saved[0], 6))  # about 10x smaller
            tmp.replace(args.compile_cache)
            print(f"compile cache written to {args.compile_cache} ({args.compile_cache.stat().st_size / 2**20:.1f} MiB, zlib)", flush=True)
    rows = [[r["preset"], r["variant"], "failed", "-", "-", "-"] if "error" in r else
            [r["preset"], r["variant"], f"{r['seconds_per_step'] * 1e3:.1f}", f"{r['steps_per_second']:.1f}",
             f"{r['speedup_over_before']:.2f}x" if r["speedup_over_before"] else "-", f"{r['warmup_seconds']:.0f}"]
            for r in results]
    table = markdown_table(["preset", "variant", "ms per step (median)", "steps/s", "vs before",
                            "warm-up s (incl. compile)"], rows)
    print(table)
    args.out.with_suffix(".md").write_text(f"# Toy-lab training speed\n\n{table}\n")


if __name__ == "__main__":
    main()
