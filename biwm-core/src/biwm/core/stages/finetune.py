"""Stage 1, ``finetune``: teach the backbone to denoise the next chunk given clean history and
camera/action control, in the bidirectional window (METHODS.md §1-2).

Each step samples one window shape for the whole batch (chunk start, history length including 0),
so shapes stay fixed within a step; the flow-matching loss covers the chunk's tokens only. A
quantizer with ``self_distill`` > 0 adds its BF16-teacher -> quantised-student term
(:mod:`biwm.core.selfdistill`), logged as ``finetune/self_distill``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from biwm.core.config import InputFile, Strict
from biwm.core.text import TextConditioning

if TYPE_CHECKING:
    from biwm.core.selfdistill import SelfDistill


class FinetuneConfig(Strict):
    stage: Literal["finetune"] = "finetune"
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1, description="the global batch: with N processes (accelerate launch "
                            "--num_processes N) each trains on batch_size / N of its clips (a multiple of N)")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    new_module_lr_scale: float = Field(10.0, gt=0, description="lr multiplier for the control injectors and the "
                                       "compressor, which start from zero rather than from pretrained weights")
    chunk_frames: int = Field(4, ge=1, description="latent frames per chunk (K)")
    max_history: int = Field(12, ge=0, description="most history latent frames sampled (the compressor may keep fewer)")
    no_history_prob: float = Field(0.1, ge=0, le=1, description="probability of a first-chunk window (no history)")
    history_noise: float = Field(0.0, ge=0, description="std of noise added to history latents (self-correction)")
    history_noise_prob: float = Field(0.5, ge=0, le=1)
    history_sigma_max: float = Field(0.0, ge=0, le=1, description=(
        "noise augmentation of the history: each sample's history is noised to a flow-matching level drawn "
        "uniformly from [0, history_sigma_max], and the model is told the level (its history tokens' timestep); "
        "sample such a model with evaluate.history_sigma > 0 (0: off)"))
    text_dropout: float = Field(0.1, ge=0, le=1)
    control_dropout: float = Field(0.1, ge=0, le=1)
    timestep_shift: float = Field(3.0, gt=0, description="shift of the training sigma distribution")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="after warm-up: constant, or a "
                                                       "cosine decay to min_lr_ratio * lr at the last step")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    ema: float | None = Field(None, gt=0, lt=1, description="EMA decay of the trained weights; model.safetensors "
                              "is then the EMA (null: the last weights)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast the forward and backward "
                                               "(fp32 master weights and optimizer)")
    compile: bool | Literal["blocks", "world", "world-graphs", "graphs"] = Field(False, description=(
        "blocks (or true): torch.compile the transformer's blocks, one graph for every history length (no faster "
        "for the toy lab's model on an H200); world: inductor over the whole forward, one static graph per "
        "history length (the toy lab's step 2.56x faster with bf16, ~45 s of compiling per length on an H200); "
        "world-graphs: world replayed in CUDA graphs (4.32x); graphs: the whole forward and backward of each "
        "history length captured in CUDA graphs without inductor (1.74x, quicker to capture; BENCHMARKS.md)"))
    log_every: int = Field(50, ge=1, description="steps between loss read-outs (each waits for the device)")
    checkpoint_every: int = Field(50, ge=1)
    train: Literal["all", "controls"] = Field("all", description="train everything, or only the control injectors")
    init: InputFile | None = Field(None, description="start from this biwm model.safetensors")

    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) ``step``: linear warm-up, then constant or cosine decay."""
        scale = min(1.0, (step + 1) / max(1, self.warmup_steps))
        if self.lr_schedule == "cosine" and step >= self.warmup_steps:
            progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
            scale = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * scale

    def check(self, recipe) -> list[str]:
        if self.lr * max(1.0, self.new_module_lr_scale) > 1e3:
            return [f"lr: {self.lr:g} (x new_module_lr_scale {self.new_module_lr_scale:g}) is far above any "
                    "learning rate that trains; expected at most 1e3"]
        frames = getattr(recipe.data, "frames", None)  # a dataset whose options set the clip length
        if frames is not None and self.chunk_frames >= frames:
            return [f"chunk_frames: {self.chunk_frames} must be smaller than data.frames ({frames})"]
        return []


def sample_batch(data, cfg: FinetuneConfig, generator: torch.Generator, device: torch.device,
                 rows: torch.Tensor | None = None):
    """A batch of windows with one shared shape: (x0 chunk, history, camera).

    The clips are ``rows`` of ``data`` (a streamed batch: each of its clips once), or else
    ``cfg.batch_size`` drawn from ``generator``; the shape (chunk start, history length) is drawn from
    ``generator`` on the host. The gathering happens where ``data`` lives, so data resident on the GPU
    never crosses the bus."""
    n, _, frames = data.latents.shape[:3]
    k = cfg.chunk_frames
    tf = data.camera.num_frames // frames
    idx = torch.randint(n, (cfg.batch_size,), generator=generator) if rows is None else rows
    start = int(torch.randint(0, frames - k + 1, (1,), generator=generator))
    h_len = 0
    if start > 0 and cfg.max_history > 0 and float(torch.rand(1, generator=generator)) >= cfg.no_history_prob:
        h_len = int(torch.randint(1, min(start, cfg.max_history) + 1, (1,), generator=generator))
    idx = idx.to(data.latents.device, non_blocking=True)
    window = data.latents[idx, :, start - h_len:start + k].to(device)  # copy only the frames used
    # contiguous: a compiled forward (compile: world) then sees strides that follow from the sizes, and
    # one graph serves every history length
    history, x0 = window[:, :, :h_len].contiguous(), window[:, :, h_len:].contiguous()
    camera = data.camera.select(idx).frames(slice((start - h_len) * tf, (start + k) * tf)).to(device).contiguous()
    return x0, history, camera


def make_optimizer(world, cfg: FinetuneConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over what trains; the control injectors and the compressor, which start from zero or
    from derived weights, at ``new_module_lr_scale`` times the rate (the group's ``lr_scale``)."""
    new = {id(p) for m in (world.controls, world.compressor) for p in m.parameters()}
    params = [p for p in world.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in new], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in new], "lr_scale": cfg.new_module_lr_scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay,
                             betas=(0.9, 0.99), fused=fused or None)


def finetune_loss(world, cfg: FinetuneConfig, x0: torch.Tensor, history: torch.Tensor, camera,
                  text: TextConditioning, null_text: TextConditioning, generator: torch.Generator,
                  attention: str | None = None, part: tuple[int, int] | None = None, *,
                  self_distill: SelfDistill | None = None) -> torch.Tensor:
    """Flow-matching loss of one batch of windows: the chunk noised to a random level, optional
    noise on the history, text and control dropped per sample (for classifier-free guidance).
    ``self_distill``: plus that term on the same window and the same predicted velocity (it draws
    nothing, so the flow-matching part is the same with or without it).

    Every random draw comes from ``generator`` on its own device (a CUDA generator keeps the step
    free of host-to-device copies). ``part`` (rank, processes): the batch is that rank's consecutive
    share of a global batch, and each draw is the global batch's, of which it keeps its rows, so N
    processes draw what one process draws for the whole batch."""
    from biwm.core.schedule import add_noise, training_sigmas, velocity_target
    from biwm.core.window import Window, noise_history

    device = x0.device
    where = generator.device
    b = x0.shape[0]
    full, rows = (b, slice(None)) if part is None else (b * part[1], slice(part[0] * b, (part[0] + 1) * b))

    def draw(fn, *shape: int) -> torch.Tensor:  # per sample: the global batch's draw, this share's rows
        return fn((full, *shape), generator=generator, device=where)[rows].to(device)

    noise = draw(torch.randn, *x0.shape[1:])
    sigma = training_sigmas(full, cfg.timestep_shift, generator, device=where)[rows].to(device)
    if cfg.history_noise > 0 and history.shape[2]:
        noisy = (draw(torch.rand) < cfg.history_noise_prob).float()
        history = history + cfg.history_noise * noisy.view(-1, 1, 1, 1, 1) * draw(torch.randn, *history.shape[1:])
    history_sigma = None
    if cfg.history_sigma_max > 0 and history.shape[2]:
        history_sigma = draw(torch.rand) * cfg.history_sigma_max
    drop_text = draw(torch.rand) < cfg.text_dropout
    batch_text = TextConditioning.where(drop_text, null_text, text)
    control_mask = (draw(torch.rand) >= cfg.control_dropout).float()
    window = Window(text=batch_text, chunk=add_noise(x0, noise, sigma), timestep=world.backbone.timestep(sigma), history=history,
                    camera=camera, control_mask=control_mask, attention=attention)
    if history_sigma is not None:
        window = noise_history(window, history_sigma, draw(torch.randn, *history.shape[1:]))
    with torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
        velocity = world(window)
        distilled = None if self_distill is None else self_distill(world, window, sigma, velocity)
    loss = torch.nn.functional.mse_loss(velocity.float(), velocity_target(x0, noise).float())
    return loss if distilled is None else loss + distilled


def _blame(cfg: FinetuneConfig) -> str:
    """The settings that can make the loss diverge, as they stand."""
    suspects = [f"lr: {cfg.lr:g}"]
    if cfg.history_noise > 1:
        suspects.insert(0, f"history_noise: {cfg.history_noise:g} (latents are of order 1)")
    if cfg.precision == "bf16":
        suspects.append("precision: bf16")
    return "check stages.finetune " + ", ".join(suspects)


def run(ctx, cfg: FinetuneConfig, stage_dir: Path) -> dict:
    from biwm.core.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, save_weights
    from biwm.core.ema import ModelEMA
    from biwm.core.runner import progress_bar
    from biwm.core.selfdistill import SelfDistill
    from biwm.core.stages.common import (clips_text, load_world_model, model_card, text_embeddings,
                                        training_batches)

    recipe = ctx.recipe
    acc = ctx.accelerator
    device = acc.device
    from biwm.core import sharded as fsdp

    sharded = fsdp.training_sharded(acc, "finetune")  # else one process: none of the FSDP2 code runs
    if sharded and cfg.compile:
        raise ValueError("stage finetune: compile is not supported under FSDP2 yet; set it off (false) or train "
                         "in one process")
    torch.manual_seed(recipe.seed)
    world = load_world_model(ctx, init=cfg.init, strict=cfg.init is None)
    world.to(device)
    if cfg.train == "controls":
        world.requires_grad_(False)
        world.controls.requires_grad_(True)
    params = [p for p in world.parameters() if p.requires_grad]
    if not params:
        raise ValueError("stage finetune: nothing to train (train: controls with no controls in the model)")
    optimizer = make_optimizer(world, cfg, fused=device.type == "cuda")
    self_distill = SelfDistill.from_recipe(recipe)

    dataset = ctx.dataset
    tf = world.backbone.temporal_factor
    latent_frames = 1 + (dataset.frames - 1) // tf
    draw = training_batches(ctx, cfg.batch_size, latent_frames, world.backbone, device, resident=True)
    part = (acc.process_index, acc.num_processes) if sharded else None
    prompt_text, null_text = text_embeddings(world, dataset.prompt, cfg.batch_size // acc.num_processes, device)

    if sharded:
        fsdp.prepare_plugin(acc, world)
    world, optimizer = acc.prepare(world, optimizer)
    model = acc.unwrap_model(world)
    if sharded:  # FSDP2 replaced the parameters by their shards
        fsdp.register_window_forwards(world)
        params = [p for p in world.parameters() if p.requires_grad]
        ctx.console.print(fsdp.describe(world, acc), highlight=False)
    forward = world
    if cfg.compile in (True, "blocks"):
        from biwm.core.speed import compile_blocks

        # the transformer blocks with the token count symbolic: every history length (0..max_history)
        # runs one graph instead of compiling one per length
        compile_blocks(model, dynamic=True)
    elif cfg.compile:
        from biwm.core.speed import compile_world

        # one static graph per history length, compiled on first use: a symbolic history length compiles
        # three graphs on torch 2.13 (CPU), but on torch 2.11 + CUDA it did not finish compiling in 10 minutes
        # and automatic dynamic shapes failed with a shape error (BENCHMARKS.md); graphs: CUDA graphs of eager
        # kernels; self-distillation's full-precision teacher forward compiles graphs of its own
        options = {"backend": "cudagraphs"} if cfg.compile == "graphs" else (
            {"mode": "reduce-overhead"} if cfg.compile == "world-graphs" else {})
        compile_world(model, dynamic=False, recompile_limit=2 * (cfg.max_history + 2) * (1 if self_distill is None else 2),
                      **options)
    if sharded:  # averaged shard by shard, with ModelEMA's rule; kept in the sharded checkpoints
        ema = fsdp.ShardedEMA(model.trainable_modules(), cfg.ema) if cfg.ema else None
    else:
        ema = ModelEMA(model.trainable_modules(), cfg.ema) if cfg.ema else None
    saved = {**model.trainable_modules(), **({"ema": ema} if ema is not None else {})}
    generator = torch.Generator().manual_seed(recipe.seed + 1)  # window shapes and clips, on the host
    noise_generator = torch.Generator(device)  # noise and dropout, reseeded per step: resumable, no state
    ckpt_dir = stage_dir / "checkpoints"
    step, meta = 0, {}
    if ctx.resume and (ckpts := list_checkpoints(ckpt_dir)):
        meta = (fsdp.load_sharded_checkpoint(ckpts[-1], world, optimizer, generator, acc,
                                             tensors=ema.shadow if ema is not None else None) if sharded else
                load_checkpoint(ckpts[-1], saved, {"model": optimizer}, generator))
        step = meta["step"]
        ctx.console.print(f"resumed finetune from {ckpts[-1].name} (step {step})")
    done_before = meta.get("extra", {})  # the interrupted part's losses and time, for the metrics

    losses: list[float] = list(done_before.get("losses", []))
    pending: list[torch.Tensor] = []  # losses still on the device, read every log_every steps
    distilled: list[torch.Tensor] = []  # the self-distillation terms in them, likewise
    distilled_last: float | None = None
    shown = step
    started = time.time() - float(done_before.get("seconds", 0.0))
    world.train()

    def read_losses() -> None:
        if not pending:
            return
        values = torch.stack(pending)
        values = (acc.reduce(values, "mean") if sharded else values).tolist()  # the global batch's loss
        pending.clear()
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            at = step - len(values) + bad + 1
            raise FloatingPointError(f"finetune loss is {values[bad]} at step {at}; {_blame(cfg)}")
        losses.extend(values)

    def read_distilled() -> dict[str, float]:
        """The mean self-distillation term since the last read, for the log ({} without the term)."""
        nonlocal distilled_last
        if distilled:
            values = torch.stack(distilled)
            distilled.clear()
            distilled_last = float((acc.reduce(values, "mean") if sharded else values).mean())
        return {} if distilled_last is None else {"finetune/self_distill": distilled_last}

    with progress_bar(ctx.console, "finetune", cfg.steps, completed=step) as update:
        while step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step) * group["lr_scale"]
            noise_generator.manual_seed(recipe.seed * 1_000_003 + step)
            batch, rows = draw(generator)
            x0, history, camera = sample_batch(batch, cfg, generator, device, rows)
            text = clips_text(batch, prompt_text, device, rows)
            loss = finetune_loss(forward, cfg, x0, history, camera, text, null_text, noise_generator, part=part,
                                 self_distill=self_distill)
            acc.backward(loss)
            grad_norm = acc.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model.trainable_modules(), step)
            step += 1
            pending.append(loss.detach())
            if self_distill is not None:
                distilled.append(self_distill.take())
            if step % cfg.log_every == 0 or step == cfg.steps:
                read_losses()
                distill_log = read_distilled()
                recent = losses[-cfg.log_every:]
                update(advance=step - shown, loss=sum(recent) / len(recent), lr=cfg.lr_at(step - 1))
                if getattr(ctx, "log_with", None):  # the grad norm read costs a sync: only for a tracker, once per log_every steps
                    ctx.log({"finetune/loss": sum(recent) / len(recent), "finetune/lr": cfg.lr_at(step - 1),
                             "finetune/grad_norm": float(grad_norm), **distill_log}, step=step)
                shown = step
            if step % cfg.checkpoint_every == 0 and step < cfg.steps and sharded:  # every rank writes its shards
                read_losses()
                fsdp.save_sharded_checkpoint(ckpt_dir, step, world, optimizer,
                                             {"losses": losses, "seconds": time.time() - started}, generator, acc,
                                             tensors=ema.shadow if ema is not None else None)
            elif step % cfg.checkpoint_every == 0 and step < cfg.steps and acc.is_main_process:
                read_losses()
                save_checkpoint(ckpt_dir, step, saved, {"model": optimizer},
                                {"losses": losses, "seconds": time.time() - started}, generator)
    read_losses()
    seconds = time.time() - started

    if sharded:  # gathered in full on rank 0, which alone writes it
        if ema is not None:
            fsdp.reshard(world)
            ema.copy_to(model.trainable_modules())  # the live weights are not used after this
        weights = fsdp.full_weights(world, model.trainable_modules(), acc)
        if acc.is_main_process:
            save_weights(stage_dir / "model.safetensors", {}, {"stage": "finetune", **model_card(ctx, "finetune")},
                         weights=weights)
    elif acc.is_main_process:
        final = ema.modules_by_name() if ema is not None else model.trainable_modules()
        if not all(bool(torch.isfinite(p).all()) for m in final.values() for p in m.parameters()):
            raise FloatingPointError(f"finetune weights hold NaN or inf after step {step}; {_blame(cfg)}")
        save_weights(stage_dir / "model.safetensors", final, {"stage": "finetune", **model_card(ctx, "finetune")})
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    return {"finetune_steps": step, "finetune_loss_first": sum(head) / len(head) if head else None,
            "finetune_loss_last": sum(tail) / len(tail) if tail else None,
            **({"finetune_self_distill_last": distilled_last} if distilled_last is not None else {}),
            "finetune_seconds": round(seconds, 1),
            "finetune_steps_per_second": round(len(losses) / seconds, 2) if seconds > 0 else None}
