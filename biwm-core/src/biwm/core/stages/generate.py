"""Stage ``generate``: roll out the dataset's held-out trajectories chunk by chunk from their true
history, with the true actions and (baseline) with another trajectory's actions, and score the
continuations against the ground truth. Writes mp4s (truth | correct | shuffled) and a PNG strip.
The shuffled baseline and a key string integrate actions into poses, so they need a dataset with
:class:`biwm.core.protocols.ActionSteps` (the toy world)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from biwm.core.config import InputFile, Strict, show


class GenerateConfig(Strict):
    stage: Literal["generate"] = "generate"
    trajectories: int = Field(4, ge=1, description="held-out trajectories to roll out")
    history_frames: int = Field(4, ge=1, description="true history latent frames given to the model")
    chunks: int = Field(3, ge=1)
    chunk_frames: int = Field(4, ge=1, description="latent frames per chunk (K)")
    steps: int = Field(20, ge=1, description="denoising steps per chunk")
    shift: float = Field(3.0, gt=0)
    cfg_scale: float = Field(1.0, ge=0, description="classifier-free guidance on text and control (1 = off)")
    history_sigma: float = Field(0.0, ge=0, lt=1, description="noise the history to this level before each chunk "
                                 "(for a model trained with stages.finetune.history_sigma_max; 0: clean history)")
    shuffled_baseline: bool = Field(True, description="also roll out with another trajectory's actions")
    keys: str | None = Field(None, description="also roll out this key string (e.g. 'w*8,j*4') from the first held-out scene")
    fps: int = Field(8, ge=1)
    write_videos: bool = Field(True, description="write mp4s and the PNG strip (metrics only if false)")
    seed: int = 0
    init: InputFile | None = Field(None, description="biwm model.safetensors to generate with (default: previous stage)")

    def rollout_frames(self, recipe) -> int:
        """Video frames the rollout generates after the true history (what ``keys`` must cover)."""
        geometry = getattr(recipe.resolved.get("model.backbone"), "frame_geometry", None)
        return (geometry()[0] if geometry else 1) * self.chunks * self.chunk_frames

    def check(self, recipe) -> list[str]:
        from biwm.core.camera import key_frames, parse_keys

        if self.keys is None:
            return []
        frames = key_frames(self.keys)
        needed = self.rollout_frames(recipe)
        if frames is not None and frames != needed:
            return [f"keys: {show(self.keys)} gives {frames} frames, but the rollout generates {needed} (chunks "
                    f"{self.chunks} x chunk_frames {self.chunk_frames} latent frames, in video frames); give "
                    f"exactly {needed}, e.g. pad with _*{abs(needed - frames)}" if frames < needed else
                    f"keys: {show(self.keys)} gives {frames} frames, but the rollout generates {needed} (chunks "
                    f"{self.chunks} x chunk_frames {self.chunk_frames} latent frames, in video frames); give exactly "
                    f"{needed}, or raise chunks"]
        try:
            parse_keys(self.keys)
        except ValueError as exc:
            return [f"keys: {exc}"]
        return []


def run(ctx, cfg: GenerateConfig, stage_dir: Path) -> dict:
    from biwm.core.camera import CameraTrack, actions_to_poses, parse_keys
    from biwm.core.data import video_frames_for
    from biwm.core.evaluation import rollout_video, shuffled_camera
    from biwm.core.video import as_uint8
    from biwm.core.metrics import finite_mean, psnr
    from biwm.core.protocols import ActionSteps
    from biwm.core.stages.common import clips_text, load_world_model, sampler_for, text_embeddings
    from biwm.core.video import write_mp4, write_strip

    recipe = ctx.recipe
    device = ctx.device
    world = load_world_model(ctx, init=cfg.init).to(device).eval()
    bb = world.backbone
    tf = bb.temporal_factor
    h_lat = cfg.history_frames
    total_lat = h_lat + cfg.chunks * cfg.chunk_frames
    dataset = ctx.dataset
    with ctx.console.status(f"reading {cfg.trajectories} held-out trajectories ({recipe.data.source})"):
        data = dataset.latents("heldout", cfg.trajectories, total_lat, bb, ctx.run_dir / "cache", ctx.cache_key(),
                               device=device, keep_frames=True)
    action_steps = dataset if isinstance(dataset, ActionSteps) else None  # shuffled and keys integrate actions
    if action_steps is None and (cfg.shuffled_baseline or cfg.keys is not None):
        ctx.console.print(f"[yellow]dataset {recipe.data.source} has no action steps[/]: no shuffled-actions "
                          "baseline or keys rollout (they integrate actions into poses)")
    n = len(data)
    prompt_text, null_text = text_embeddings(world, dataset.prompt, n, device)
    text = clips_text(data, prompt_text, device)  # the clips' own captions, when they have them
    history = data.latents[:, :, :h_lat].to(device)
    raw_camera = data.camera.frames(slice(tf - 1, None))  # video rate, T = 1 + tf*(F-1)
    h_video = video_frames_for(h_lat, tf)
    truth = data.frames[:, h_video:]  # [N, T', 3, H, W] uint8

    sampler = sampler_for(ctx, cfg.init, cfg.steps, cfg.shift, cfg.cfg_scale, cfg.history_sigma)

    def generate(camera: CameraTrack, label: str, rows: slice = slice(None)) -> torch.Tensor:
        with ctx.console.status(f"rollout ({label}): {cfg.chunks} chunks x {cfg.steps} steps"):
            video = rollout_video(world, text.select(rows), null_text, history[rows], camera, cfg.chunks,
                                  cfg.chunk_frames, sampler, cfg.seed)
        if video.is_floating_point() and not bool(torch.isfinite(video).all()):
            raise FloatingPointError(f"the rollout ({label}) produced NaN or inf frames with {sampler.describe()}; "
                                     "the model's weights or the sampler settings (cfg_scale, shift) are to blame")
        return video

    correct = generate(raw_camera, "correct actions")
    copy_last = data.frames[:, h_video - 1:h_video].expand_as(truth)  # the trivial "nothing moves" forecast
    metrics = {"psnr_correct_actions": finite_mean(psnr(correct, truth), "PSNR of the correct-action rollout"),
               "psnr_copy_last_frame": finite_mean(psnr(copy_last, truth), "PSNR of copying the last frame"),
               "psnr_correct_per_trajectory": psnr(correct, truth).tolist()}
    rows = {"truth": truth, "correct": correct}
    if cfg.shuffled_baseline and n > 1 and action_steps is not None:
        shuffled = generate(shuffled_camera(raw_camera, h_video, action_steps), "shuffled actions")
        metrics["psnr_shuffled_actions"] = finite_mean(psnr(shuffled, truth), "PSNR of the shuffled rollout")
        metrics["psnr_shuffled_per_trajectory"] = psnr(shuffled, truth).tolist()
        rows["shuffled"] = shuffled
    metrics.update(trajectories=n, history_latent_frames=h_lat, chunks=cfg.chunks, steps=cfg.steps,
                   cfg_scale=cfg.cfg_scale)

    stage_dir.mkdir(parents=True, exist_ok=True)
    past = data.frames[:, :h_video]
    ctx.console.print(f"generate: PSNR correct actions {metrics['psnr_correct_actions']:.2f} dB"
                      + (f", shuffled {metrics['psnr_shuffled_actions']:.2f} dB" if "psnr_shuffled_actions" in metrics else ""))
    if not cfg.write_videos:
        return metrics
    for i in range(n):
        # side by side: truth | correct | shuffled, after the shared true history
        video = torch.cat([torch.cat([past[i], as_uint8(rows[k][i])]) for k in rows], dim=-1)
        write_mp4(stage_dir / f"trajectory_{i}.mp4", video, fps=cfg.fps, scale=4)
    write_strip(stage_dir / "strip.png", [torch.cat([past[0], as_uint8(rows[k][0])]) for k in rows],
                scale=max(1, 128 // past.shape[-1]), labels=[{"truth": "truth", "correct": "true actions", "shuffled": "other actions"}[k] for k in rows],
                history=past.shape[1])
    if cfg.keys is not None and action_steps is not None:
        keys = parse_keys(cfg.keys).to(raw_camera.c2w.device)
        if len(keys) != truth.shape[1]:  # validation checks this; a recipe built by hand may not be validated
            raise ValueError(f"keys: {len(keys)} frames for a rollout of {truth.shape[1]}")
        frames = len(keys)
        first = raw_camera.select(slice(0, 1))
        actions = first.actions.clone()
        actions[0, h_video:h_video + frames] = keys[:frames]
        c2w = first.c2w.clone()
        c2w[:, h_video:h_video + frames] = actions_to_poses(actions[:, h_video:h_video + frames], first.c2w[:, h_video - 1],
                                                            action_steps.move_step, action_steps.turn_step_deg)
        keyed = generate(CameraTrack(c2w, first.intrinsics, actions), f"keys {cfg.keys}", slice(0, 1))
        write_mp4(stage_dir / "keys.mp4", torch.cat([past[0], as_uint8(keyed[0])]), fps=cfg.fps, scale=4)
        metrics["keys"] = cfg.keys
    return metrics
