"""Stage 1, ``finetune``: teach the backbone to denoise the next chunk given clean history and
camera/action control, in the bidirectional window (METHODS.md §1-2).

Each step samples one window shape for the whole batch (chunk start, history length including 0),
so shapes stay fixed within a step; the flow-matching loss covers the chunk's tokens only.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from biwm.core.config import InputFile, Strict


class FinetuneConfig(Strict):
    stage: Literal["finetune"] = "finetune"
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
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
    text_dropout: float = Field(0.1, ge=0, le=1)
    control_dropout: float = Field(0.1, ge=0, le=1)
    timestep_shift: float = Field(3.0, gt=0, description="shift of the training sigma distribution")
    checkpoint_every: int = Field(50, ge=1)
    train: Literal["all", "controls"] = Field("all", description="train everything, or only the control injectors")
    init: InputFile | None = Field(None, description="start from this biwm model.safetensors")

    def check(self, recipe) -> list[str]:
        frames = recipe.data.frames
        if self.chunk_frames >= frames:
            return [f"chunk_frames: {self.chunk_frames} must be smaller than data.frames ({frames})"]
        return []


def sample_batch(data, cfg: FinetuneConfig, generator: torch.Generator, device: torch.device):
    """A batch of windows with one shared shape: (x0 chunk, history, camera)."""
    n, _, frames = data.latents.shape[:3]
    k = cfg.chunk_frames
    tf = data.camera.num_frames // frames
    idx = torch.randint(n, (cfg.batch_size,), generator=generator)
    start = int(torch.randint(0, frames - k + 1, (1,), generator=generator))
    h_len = 0
    if start > 0 and cfg.max_history > 0 and float(torch.rand(1, generator=generator)) >= cfg.no_history_prob:
        h_len = int(torch.randint(1, min(start, cfg.max_history) + 1, (1,), generator=generator))
    window = data.latents[idx, :, start - h_len:start + k].to(device)  # copy only the frames used
    history, x0 = window[:, :, :h_len], window[:, :, h_len:]
    camera = data.camera.select(idx).frames(slice((start - h_len) * tf, (start + k) * tf)).to(device)
    return x0, history, camera


def make_optimizer(world, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over what trains; the control injectors and the compressor, which start from zero or
    from derived weights, at ``new_module_lr_scale`` times the rate (the group's ``lr_scale``)."""
    new = {id(p) for m in (world.controls, world.compressor) for p in m.parameters()}
    params = [p for p in world.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in new], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in new], "lr_scale": cfg.new_module_lr_scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay,
                             betas=(0.9, 0.99))


def finetune_loss(world, cfg: FinetuneConfig, x0: torch.Tensor, history: torch.Tensor, camera, text: torch.Tensor,
                  null_text: torch.Tensor, generator: torch.Generator, attention: str) -> torch.Tensor:
    """Flow-matching loss of one batch of windows: the chunk noised to a random level, optional
    noise on the history, text and control dropped per sample (for classifier-free guidance)."""
    from biwm.core.schedule import add_noise, training_sigmas, velocity_target
    from biwm.core.window import Window

    device = x0.device
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator).to(device)
    sigma = training_sigmas(b, cfg.timestep_shift, generator).to(device)
    if cfg.history_noise > 0 and history.shape[2]:
        noisy = (torch.rand(b, generator=generator) < cfg.history_noise_prob).float().to(device)
        history = history + cfg.history_noise * noisy.view(-1, 1, 1, 1, 1) * torch.randn(
            history.shape, generator=generator).to(device)
    drop_text = (torch.rand(b, generator=generator) < cfg.text_dropout).to(device)
    batch_text = torch.where(drop_text.view(-1, 1, 1), null_text.expand_as(text), text)
    control_mask = (torch.rand(b, generator=generator) >= cfg.control_dropout).float().to(device)
    window = Window(text=batch_text, chunk=add_noise(x0, noise, sigma), timestep=sigma * 1000, history=history,
                    camera=camera, control_mask=control_mask, attention=attention)
    return torch.nn.functional.mse_loss(world(window).float(), velocity_target(x0, noise).float())


def run(ctx, cfg: FinetuneConfig, stage_dir: Path) -> dict:
    from biwm.core.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, save_weights
    from biwm.core.data import toyworld_latents
    from biwm.core.runner import progress_bar
    from biwm.core.stages.common import load_world_model, text_embeddings

    recipe = ctx.recipe
    acc = ctx.accelerator
    device = acc.device
    torch.manual_seed(recipe.seed)
    world = load_world_model(ctx, init=cfg.init, strict=cfg.init is None)
    world.to(device)
    if cfg.train == "controls":
        world.requires_grad_(False)
        world.controls.requires_grad_(True)
    params = [p for p in world.parameters() if p.requires_grad]
    if not params:
        raise ValueError("stage finetune: nothing to train (train: controls with no controls in the model)")
    optimizer = make_optimizer(world, cfg)

    tf = world.backbone.temporal_factor
    latent_frames = 1 + (recipe.data.frames - 1) // tf
    with ctx.console.status(f"rendering and encoding {recipe.data.train_clips} toy-world training clips"):
        data = toyworld_latents("train", recipe.data.train_clips, latent_frames, recipe.data.toyworld, world.backbone,
                                ctx.run_dir / "cache", ctx.cache_key(), device=device)
    text, null_text = text_embeddings(world, recipe.data.prompt, cfg.batch_size, device)

    world, optimizer = acc.prepare(world, optimizer)
    model = acc.unwrap_model(world)
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    ckpt_dir = stage_dir / "checkpoints"
    step = 0
    if ctx.resume and (ckpts := list_checkpoints(ckpt_dir)):
        meta = load_checkpoint(ckpts[-1], model.trainable_modules(), {"model": optimizer}, generator)
        step = meta["step"]
        ctx.console.print(f"resumed finetune from {ckpts[-1].name} (step {step})")

    losses: list[float] = []
    started = time.time()
    world.train()
    with progress_bar(ctx.console, "finetune", cfg.steps, completed=step) as update:
        while step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * group["lr_scale"] * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            x0, history, camera = sample_batch(data, cfg, generator, device)
            loss = finetune_loss(world, cfg, x0, history, camera, text, null_text, generator, recipe.model.attention)
            acc.backward(loss)
            acc.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"finetune loss is {value} at step {step}; lower stages.finetune.lr")
            losses.append(value)
            update(loss=sum(losses[-20:]) / len(losses[-20:]), hist=history.shape[2])
            if step % cfg.checkpoint_every == 0 and step < cfg.steps and acc.is_main_process:
                save_checkpoint(ckpt_dir, step, model.trainable_modules(), {"model": optimizer}, {}, generator)

    if acc.is_main_process:
        save_weights(stage_dir / "model.safetensors", model.trainable_modules(), {"stage": "finetune"})
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    return {"finetune_steps": step, "finetune_loss_first": sum(head) / len(head) if head else None,
            "finetune_loss_last": sum(tail) / len(tail) if tail else None,
            "finetune_seconds": round(time.time() - started, 1)}
