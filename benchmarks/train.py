"""Training cost at real size: one stage-1 step and one full DMD iteration, timed with the stages'
own code (``finetune_loss`` and ``Distiller.iteration``), random weights, bf16 weights, gradient
checkpointing, batch 1.

    python benchmarks/train.py --preset wan2.1-t2v-1.3b --out docs/results/gpu_train_h100
    python benchmarks/train.py --preset tiny --steps 1 --out /tmp/train   # CPU smoke run

- ``stage1``: a window of ``--history`` framepack-compressed history latent frames + a 4-frame
  chunk at 832x480; flow-matching loss, backward, gradient clipping, AdamW step.
- ``stage1-fp8``: the same step with the transformer blocks' linears converted for FP8 training
  (biwm-quant's ``fp8`` quantizer, torchao float8 training, rowwise scales; eager, as ``stage1``).
  ``vs_stage1``: its step time over ``stage1``'s measured in the same run (below 1: faster). Where
  no FP8 GEMM exists (the CPU, GPUs before compute capability 8.9) torchao emulates the casts
  (``fp8_emulated``): a ratio of the emulation, not of FP8 GEMMs.
- ``dmd`` / ``dmd-lora``: the generator rolls out 5 chunks x 4 latent frames after 1 true latent
  frame (81 video frames) with 4 student steps, exiting at the last (so every step runs); DMD
  loss through the teacher (CFG 3, doubled batch) and the critic, generator update and EMA; then
  the critic's flow-matching update on the 5 chunks. ``dmd`` trains a full critic copy,
  ``dmd-lora`` LoRA adapters (rank 16) on the teacher's frozen base.

Reported per part: median step time over ``--steps`` timed steps after one warm-up, peak memory
(``torch.cuda.max_memory_allocated`` during the timed steps: weights, optimiser states, activations;
``peak_gb_first_steps`` covers building the networks and the first two steps),
and MFU: model FLOPs of one step (each forward counted by torch's FlopCounterMode; a trained
forward's backward as 2x its forward, 1x with a LoRA critic's frozen base; gradient
checkpointing's recomputation counts toward ``hfu`` only), over the step time and the bf16 GEMM
peak measured in the same run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (SIZES, base_parser, build_world, environment, gemm_peak_tflops, keyboard_camera,  # noqa: E402
                     latent_grid, markdown_table, median, parse_list, peak_memory_gb, reset_memory, synchronize,
                     write_json)

PARTS = ["stage1", "stage1-fp8", "dmd", "dmd-lora"]


class CountedForwards:
    """Counts a step's FLOPs forward by forward: each world-model forward's FLOPs are measured once
    per window shape by torch's FlopCounterMode on a no-grad replay, and a forward that runs with
    grad is charged its backward too: 2x for weight and activation gradients, 1x (activations
    only) where nothing but LoRA adapters trains, and 1x more for gradient checkpointing's
    recomputation (hardware FLOPs only). Counting a whole step under FlopCounterMode instead
    defeats activation checkpointing (30 GB more at peak for one stage-1 step of Wan2.1-1.3B)."""

    def __init__(self, worlds, checkpointing: bool):
        self.active = False
        self.checkpointing = checkpointing
        self.cache: dict[tuple, int] = {}
        self.model_flops = self.recompute_flops = 0
        for world in {id(w): w for w in worlds}.values():
            full = any(p.requires_grad for n, p in world.named_parameters() if "lora_" not in n)
            world.forward = self._wrap(world, world.forward, 2 if full else 1)

    def _wrap(self, world, inner, backward_factor: int):
        from torch.utils.flop_counter import FlopCounterMode

        def forward(window):
            if self.active:
                key = (id(world), window.history_length, tuple(window.chunk.shape))
                if key not in self.cache:
                    with torch.no_grad(), FlopCounterMode(display=False) as counter:
                        inner(window)
                    self.cache[key] = counter.get_total_flops()
                flops = self.cache[key]
                grad = torch.is_grad_enabled()
                self.model_flops += flops * (1 + backward_factor if grad else 1)
                self.recompute_flops += flops if grad and self.checkpointing else 0
            return inner(window)

        return forward

    def count(self, step: Callable[[], Any]) -> tuple[int, int]:
        """(model FLOPs of one step, FLOPs recomputed by gradient checkpointing)."""
        self.model_flops = self.recompute_flops = 0
        self.active = True
        try:
            step()
        finally:
            self.active = False
        return self.model_flops, self.recompute_flops


def stage1(args, device: torch.device, fp8: bool = False):
    from biwm.core.stages.common import text_embeddings
    from biwm.core.stages.finetune import FinetuneConfig, finetune_loss, make_optimizer

    world = build_world(args.preset, device, args.dtype, gradient_checkpointing=args.checkpointing).train()
    quantized = {}
    if fp8:  # as a recipe's model.quantize: {name: fp8} converts it for training
        import warnings

        from biwm.core.plugins import get_plugin_manager
        from biwm.quant.fp8 import fp8_gemm_available

        quantizer = get_plugin_manager().get("quantizer", "fp8").create({"granularity": "row"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the emulation is recorded below
            quantizer.convert(world.backbone.trainable(), training=True)
        quantized = {"quantize": "fp8 rowwise (torchao float8 training)",
                     "fp8_emulated": not fp8_gemm_available(device)}
    h, w = latent_grid(world, args.height, args.width)
    bb = world.backbone
    cfg = FinetuneConfig(chunk_frames=4, max_history=args.history)
    optimizer = make_optimizer(world, cfg)
    params = [p for p in world.parameters() if p.requires_grad]
    text, null = text_embeddings(world, "a walk through a house", 1, device)
    frames = args.history + cfg.chunk_frames
    clips = torch.randn(1, bb.latent_channels, frames, h, w, device=device)
    camera = keyboard_camera(frames, bb.temporal_factor, args.width / args.height, device)
    rng = torch.Generator().manual_seed(0)

    def step() -> None:
        loss = finetune_loss(world, cfg, clips[:, :, args.history:], clips[:, :, :args.history], camera, text, null,
                             rng, "bidirectional")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tokens = world.compressor.token_budget(args.history, (h // 2, w // 2)) + cfg.chunk_frames * (h // 2) * (w // 2)
    setup = {"history_latent_frames": args.history, "chunk_latent_frames": cfg.chunk_frames, "window_tokens": tokens,
             "trainable_params_m": sum(p.numel() for p in params) / 1e6, **quantized}
    return step, [world], setup


def dmd(args, device: torch.device, critic: str):
    from biwm.core.dmd import DMD, student_sigmas
    from biwm.core.stages.common import text_embeddings
    from biwm.core.stages.distill import DistillConfig, Distiller

    cfg = DistillConfig(history_frames=1, chunks=5, chunk_frames=4, generator_every=1, critic=critic)
    seeds = iter(range(100))
    nets = Distiller(cfg, lambda report: build_world(args.preset, device, args.dtype, seed=next(seeds),
                                                     gradient_checkpointing=args.checkpointing),
                     lambda backbone: [DMD()], device)
    bb = nets.generator.backbone
    h, w = latent_grid(nets.generator, args.height, args.width)
    text, null = text_embeddings(nets.generator, "a walk through a house", 1, device)
    frames = cfg.history_frames + cfg.chunks * cfg.chunk_frames
    clips = torch.randn(1, bb.latent_channels, frames, h, w, device=device)
    camera = keyboard_camera(frames, bb.temporal_factor, args.width / args.height, device)
    sigmas = student_sigmas(cfg.student_steps, cfg.student_shift, device)
    rng = torch.Generator().manual_seed(0)

    def step() -> None:
        nets.iteration(0, clips, camera, text, null, sigmas, rng, exit_step=cfg.student_steps - 1)

    critic_params = sum(p.numel() for p in nets.critic_params if p.requires_grad) / 1e6
    setup = {"history_latent_frames": cfg.history_frames, "chunks": cfg.chunks, "chunk_latent_frames": cfg.chunk_frames,
             "student_steps": cfg.student_steps, "exit_step": cfg.student_steps - 1, "teacher_cfg": cfg.teacher_cfg,
             "critic": critic, "critic_trainable_params_m": critic_params, "ema": cfg.ema}
    return step, [nets.generator, nets.teacher, nets.critic], setup


def measure(part: str, args, device: torch.device, peak: float) -> dict[str, Any]:
    reset_memory(device)
    started = time.perf_counter()
    if part in ("stage1", "stage1-fp8"):
        step, worlds, setup = stage1(args, device, fp8=part == "stage1-fp8")
    else:
        step, worlds, setup = dmd(args, device, "lora" if part == "dmd-lora" else "full")
    counted = CountedForwards(worlds, args.checkpointing)
    step()  # warm-up: optimiser states, cuBLAS workspaces
    synchronize(device)
    flops, recompute = counted.count(step)
    synchronize(device)
    first_peak = peak_memory_gb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    step_s = median(times)
    model_flops, flops = flops, flops + recompute
    out = {**setup, "step_s": step_s, "step_s_all": times, "peak_gb": peak_memory_gb(device),
           "peak_gb_first_steps": first_peak,
           "reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
           "tflop_per_step": model_flops / 1e12, "tflop_per_step_with_recompute": flops / 1e12,
           "mfu": model_flops / step_s / 1e12 / peak, "hfu": flops / step_s / 1e12 / peak,
           "setup_s": time.perf_counter() - started - sum(times)}
    del step, worlds, counted
    reset_memory(device)
    return out


HEADER = ["part", "step s", "vs stage1", "TFLOP/step", "MFU", "HFU", "peak GB", "reserved GB"]


def rows(results: dict[str, Any]) -> list[list[Any]]:
    out = []
    for part, r in results.items():
        if "error" in r:
            out.append([part, f"failed: {r['error'][:60]}"] + [None] * (len(HEADER) - 2))
        else:
            out.append([part, r["step_s"], r.get("vs_stage1"), r["tflop_per_step"], r["mfu"], r["hfu"], r["peak_gb"],
                        r["reserved_gb"]])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--history", type=int, default=16, help="stage-1 history latent frames (default 16)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per part (after a warm-up)")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="disable gradient checkpointing")
    parser.add_argument("--out", type=Path, help="write PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)
    parts = parse_list(parser, "--parts", args.parts, PARTS)
    if args.steps < 1 or args.history < 0:
        parser.error("--steps must be >= 1 and --history >= 0")
    h, w, _ = SIZES[args.preset]
    args.height, args.width = args.height or h, args.width or w
    device = torch.device(args.device)  # cuDNN autotuning stays off, as in the stages (its trial workspaces count)

    peak = gemm_peak_tflops(device)
    print(f"{args.preset} at {args.width}x{args.height}: bf16 GEMM peak {peak:.4g} TFLOP/s", file=sys.stderr)
    results: dict[str, Any] = {}
    for part in parts:
        print(f"{part} ...", file=sys.stderr, flush=True)
        try:
            results[part] = measure(part, args, device, peak)
        except torch.cuda.OutOfMemoryError as e:
            results[part] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            reset_memory(device)
        except Exception as e:  # FP8 training that cannot run here (no torchao, a shape or dtype it refuses)
            if part != "stage1-fp8":
                raise
            results[part] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            reset_memory(device)
        print(f"  {results[part]}", file=sys.stderr, flush=True)
    fp8, bf16 = results.get("stage1-fp8", {}), results.get("stage1", {})
    if "step_s" in fp8 and "step_s" in bf16:  # both measured in this run
        fp8["vs_stage1"] = fp8["step_s"] / bf16["step_s"]

    table = markdown_table(HEADER, rows(results))
    print(table)
    if args.out:
        env = environment(device)
        data = {"preset": args.preset, "height": args.height, "width": args.width, "dtype": args.dtype,
                "gradient_checkpointing": args.checkpointing, "batch_size": 1, "peak_bf16_tflops": peak,
                **results, "environment": env, "device": env["device"], "command": "python " + " ".join(sys.argv)}
        write_json(args.out.with_suffix(".json"), data)
        from biwm.core.checkpoint import atomic_write_text

        atomic_write_text(args.out.with_suffix(".md"), f"`{data['command']}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
