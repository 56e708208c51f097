"""Long toy-world rollouts: tokens per window, seconds per chunk and PSNR per chunk for several
trained models (history compressors), on the same held-out trajectories.

    python benchmarks/long_rollout.py NAME=RUN[@key=value...] ... [--chunks 60] [--out PREFIX]

RUN is a folder written by ``biwm run`` (or a stage folder / model.safetensors inside one);
``@key=value`` overrides a field of its recipe, e.g. ``@model.compressor.options.max_frames=8`` to
roll the same weights out with a fixed last-8 window. Writes PREFIX.json (per model:
``tokens_per_window``, ``sec_per_chunk``, ``psnr_per_chunk`` lists and summaries; ``setup``),
PREFIX.md (a table) and PREFIX.png (the three curves), and prints the table.

Seconds per chunk are wall time from one chunk's end to the next's, including decoding to pixels
(the decoded chunk is copied to the host, which synchronises the GPU), after a 2-chunk warm-up
rollout. Tokens per window are counted at the transformer's input (history + chunk).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402


def parse_variant(text: str) -> tuple[str, Path, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"error: {text!r}: expected NAME=RUN[@key=value...]")
    run, *overrides = rest.split("@")
    return name, Path(run), overrides


def load(run: Path, overrides: list[str], device: str):
    from rich.console import Console

    from biwm.core.recipe import RecipeError, apply_overrides, validate_recipe
    from biwm.core.runner import RunContext, RunNotFound, evaluation_recipe_data, find_run
    from biwm.core.stages.common import load_world_model

    try:
        run_dir, weights = find_run(run)
        data = apply_overrides(evaluation_recipe_data(run_dir, weights), overrides)
        recipe = validate_recipe(data, base_dir=run_dir, source=str(run_dir / "recipe.yaml"))
    except (RunNotFound, RecipeError) as e:
        raise SystemExit(f"error: {run}: {e}")
    ctx = RunContext(recipe=recipe, run_dir=run_dir, console=Console(stderr=True))
    world = load_world_model(ctx, init=weights, report=False).to(device).eval()
    return ctx, world, weights


def measure(run: Path, overrides: list[str], args, device: str) -> dict[str, Any]:
    from biwm.core.data import video_frames_for
    from biwm.core.evaluation import quality_scores, rollout_video
    from biwm.core.stages.common import sampler_for, text_embeddings

    ctx, world, weights = load(run, overrides, device)
    recipe = ctx.recipe
    bb = world.backbone
    tf = bb.temporal_factor
    total = args.history_frames + args.chunks * args.chunk_frames
    data = ctx.dataset.latents("heldout", args.trajectories, total, bb, ctx.run_dir / "cache", ctx.cache_key(),
                               device=device, keep_frames=True)
    text, null_text = text_embeddings(world, ctx.dataset.prompt, len(data), device)
    history = data.latents[:, :, :args.history_frames].to(device)
    camera = data.camera.frames(slice(tf - 1, None))
    h_video = video_frames_for(args.history_frames, tf)
    truth = data.frames[:, h_video:]
    sampler = sampler_for(ctx, weights, args.steps, args.shift, 1.0)

    def roll(chunks: int, on_chunk=None):
        return rollout_video(world, text, null_text, history, camera, chunks, args.chunk_frames, sampler, args.seed,
                             recipe.model.attention, on_chunk=on_chunk)

    tokens, seconds, marks = [], [], []

    def chunk_done(_i: int) -> None:
        marks.append(time.perf_counter())
        seconds.append(marks[-1] - marks[-2])
        tokens.append(world.last_window_tokens)  # the chunk's last forward: history + chunk tokens

    roll(min(2, args.chunks))  # warm-up (kernels, allocator)
    marks.append(time.perf_counter())
    video = roll(args.chunks, chunk_done)
    quality = quality_scores(video, truth, args.chunk_frames * tf)
    comp = recipe.model.compressor
    out = {"compressor": comp.name, "compressor_options": recipe.resolved["model.compressor"].model_dump(mode="json"),
           "weights": str(weights), "sampler": sampler.describe(), "tokens_per_window": tokens,
           "sec_per_chunk": seconds, "psnr_per_chunk": quality["psnr_per_chunk"],
           "ssim_per_chunk": quality["ssim_per_chunk"], "psnr": quality["psnr"], "ssim": quality["ssim"]}
    return summarise(out)


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    """Summaries of the per-chunk lists: token range; median seconds per chunk over the first and
    second halves (chunk 1 left out of the first: its window is the smallest) and their ratio; the
    least-squares slope of seconds per chunk; mean PSNR over the first and last tenth."""
    sec, psnr, n = r["sec_per_chunk"], r["psnr_per_chunk"], len(r["sec_per_chunk"])
    half, tenth = max(1, n // 2), max(1, n // 10)
    first = sec[1:half] or sec[:1]
    r["tokens_max"] = max(r["tokens_per_window"])
    r["median_sec_first_half"] = statistics.median(first)
    r["median_sec_second_half"] = statistics.median(sec[half:] or sec[-1:])
    r["sec_second_over_first_half"] = r["median_sec_second_half"] / r["median_sec_first_half"]
    r["sec_slope_per_10_chunks"] = statistics.linear_regression(range(n), sec).slope * 10 if n > 1 else 0.0
    r["psnr_first"] = statistics.fmean(psnr[:tenth])
    r["psnr_last"] = statistics.fmean(psnr[-tenth:])
    return r


def table(results: dict[str, dict[str, Any]], chunks: int) -> list[str]:
    tenth = max(1, chunks // 10)
    lines = [f"| model | tokens chunk 1 | tokens chunk {chunks} | ms/chunk, median of chunks 2-{chunks // 2} | "
             f"ms/chunk, median of chunks {chunks // 2 + 1}-{chunks} | ratio | slope (ms per 10 chunks) | "
             f"PSNR first {tenth} | PSNR last {tenth} | PSNR all |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['tokens_per_window'][0]} | {r['tokens_per_window'][-1]} | "
                     f"{r['median_sec_first_half'] * 1000:.0f} | {r['median_sec_second_half'] * 1000:.0f} | "
                     f"{r['sec_second_over_first_half']:.2f} | {r['sec_slope_per_10_chunks'] * 1000:+.0f} | "
                     f"{r['psnr_first']:.2f} | {r['psnr_last']:.2f} | {r['psnr']:.2f} |")
    return lines


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    from biwm.core.report import _pyplot, _save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
    for name, r in results.items():
        x = range(1, len(r["tokens_per_window"]) + 1)
        axes[0].plot(x, r["tokens_per_window"], label=name)
        axes[1].plot(x, [s * 1000 for s in r["sec_per_chunk"]], label=name)
        axes[2].plot(x, r["psnr_per_chunk"], label=name)
    for ax, label in zip(axes, ("tokens per window", "ms per chunk", "PSNR per chunk (dB)")):
        ax.set_xlabel("chunk")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Long rollouts: cost and quality per chunk")
    _save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help="NAME=RUN[@key=value...]")
    parser.add_argument("--render", type=Path, help="re-render PREFIX.json's table and plot (no rollouts)")
    parser.add_argument("--chunks", type=int, default=60)
    parser.add_argument("--chunk-frames", type=int, default=4)
    parser.add_argument("--history-frames", type=int, default=4)
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="Euler steps per chunk (a distilled model uses its own)")
    parser.add_argument("--shift", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("long_rollout"), help="output prefix")
    parser.add_argument("--notes", type=Path, help="markdown appended to PREFIX.md")
    args = parser.parse_args(argv)
    for n in ("chunks", "chunk_frames", "history_frames", "trajectories", "steps"):
        if getattr(args, n) < 1:
            parser.error(f"--{n.replace('_', '-')} must be >= 1")
    if args.notes is not None and not args.notes.is_file():
        parser.error(f"--notes: {args.notes} not found")
    from biwm.core.checkpoint import atomic_write_text

    if args.render is not None:
        if not args.render.is_file():
            parser.error(f"--render: {args.render} not found")
        doc = json.loads(args.render.read_text())
        setup = doc.pop("setup")
        results = {name: summarise(r) for name, r in doc.items()}
        args.chunks = setup["chunks"]
        if args.out == Path("long_rollout"):
            args.out = args.render.with_suffix("")
    elif not args.variants:
        parser.error("give NAME=RUN variants to measure, or --render PREFIX.json")
    else:
        variants = [parse_variant(v) for v in args.variants]
        torch.manual_seed(args.seed)
        results = {}
        for name, run, overrides in variants:
            print(f"{name}: {args.chunks} chunks x {args.trajectories} trajectories ...", file=sys.stderr, flush=True)
            results[name] = measure(run, overrides, args, args.device)
        env = environment(torch.device(args.device))
        setup = {"device": env["device"], "date": env["date"],
                 "versions": f"torch {env['torch']}, diffusers {env['diffusers']}, biwm {env['biwm-core']}",
                 "command": "python benchmarks/long_rollout.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "chunks": args.chunks, "chunk_latent_frames": args.chunk_frames,
                 "history_latent_frames": args.history_frames, "trajectories": args.trajectories}

    out = args.out
    doc = {**results, "setup": setup}
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=2))
    plot(results, out.with_suffix(".png"))
    lines = table(results, args.chunks)
    print("\n".join(lines))
    md = [f"# Long rollouts ({args.chunks} chunks)", "", *lines, "", f"![curves]({out.name}.png)", "",
          f"Device: {setup['device']}; {setup['versions']}; {setup['date']}. Command: `{setup['command']}`", ""]
    if args.notes:
        md += [args.notes.read_text().strip(), ""]
    atomic_write_text(out.with_suffix(".md"), "\n".join(md))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
