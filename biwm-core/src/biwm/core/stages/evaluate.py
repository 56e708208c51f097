"""Stage ``evaluate``: score a world model against its dataset's held-out clips (see
:mod:`biwm.core.evaluation`) and write metrics.json, report.md and PNG plots.

Held-out trajectories are rolled out chunk by chunk from their true history with their true
actions and scored against the true continuation (quality and drift; copy-last-frame as the
trivial forecast); a distilled model is compared with its teacher on the same trajectories. A
dataset that can say more adds its own scores (:class:`biwm.core.protocols.EvaluationScores`):
the toy world of biwm-toyworld judges camera following with its inverse-dynamics model, rolls out
a shuffled-actions baseline and still-camera scenes for dynamics and diversity, reading the
options below that say so (``idm``, ``shuffled_baseline``, ``dynamics_*``, ``motion_threshold``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from biwm.core.config import InputFile, Strict


class EvaluateConfig(Strict):
    stage: Literal["evaluate"] = "evaluate"
    trajectories: int = Field(16, ge=1, description="held-out trajectories to roll out")
    history_frames: int = Field(4, ge=1, description="true history latent frames given to the model")
    chunks: int = Field(20, ge=1, description="chunks per rollout (the drift curve's length)")
    chunk_frames: int = Field(4, ge=1, description="latent frames per chunk (K)")
    steps: int = Field(20, ge=1, description="denoising steps per chunk")
    shift: float = Field(3.0, gt=0)
    cfg_scale: float = Field(1.0, ge=0, description="classifier-free guidance on text and control (1 = off)")
    history_sigma: float = Field(0.0, ge=0, lt=1, description="noise the history to this level before each chunk "
                                 "(for a model trained with stages.finetune.history_sigma_max; 0: clean history)")
    shuffled_baseline: bool = Field(True, description="also roll out with another trajectory's actions (a "
                                    "dataset's own score: the toy world's)")
    dynamics_scenes: int = Field(4, ge=0, description="still-camera scenes for dynamics and diversity (the toy "
                                 "world's; 0: skip)")
    diversity_samples: int = Field(4, ge=2, description="rollouts per still-camera scene")
    dynamics_chunks: int = Field(3, ge=1)
    motion_threshold: float = Field(0.1, gt=0, lt=1, description="pixel change (0-1 scale) that counts as motion")
    idm: InputFile | None = Field(None, description="IDM weights for the toy world's camera following (default: "
                                                    "the shipped or cached IDM for the data's rendering, trained "
                                                    "and cached if there is none)")
    idm_steps: int = Field(6000, ge=1, description="training steps if an IDM has to be trained (minutes on a "
                                                   "GPU, long on a CPU: see biwm idm train)")
    compare_teacher: bool = Field(True, description="for a distilled generator, also roll out its teacher on the "
                                                   "same trajectories (teacher_* and student_* metrics)")
    teacher_steps: int = Field(50, ge=1, description="the teacher's Euler steps per chunk")
    teacher_cfg: float = Field(3.0, ge=0, description="the teacher's classifier-free guidance")
    teacher_history_sigma: float = Field(0.0, ge=0, lt=1, description="the teacher's history noise (history_sigma)")
    seed: int = 0
    init: InputFile | None = Field(None, description="biwm model.safetensors to evaluate (default: previous stage)")
    write_report: bool = Field(True, description="write report.md and the PNG plots")


def run(ctx, cfg: EvaluateConfig, stage_dir: Path) -> dict:
    from biwm.core.data import video_frames_for
    from biwm.core.evaluation import EvaluationRun, quality_scores, rollout_video
    from biwm.core.protocols import EvaluationScores
    from biwm.core.runner import progress_bar
    from biwm.core.stages.common import clips_text, load_world_model, sampler_for, text_embeddings, weights_metadata
    from biwm.core.video import as_uint8

    recipe = ctx.recipe
    dataset = ctx.dataset
    if not isinstance(dataset, EvaluationScores):
        ctx.console.print(f"[yellow]dataset {recipe.data.source} adds no scores of its own[/]: quality and drift "
                          "only (no camera following, shuffled-actions baseline or dynamics)")
    device = ctx.device
    world = load_world_model(ctx, init=cfg.init).to(device).eval()
    scorer = dataset.evaluation_scorer(ctx, cfg) if isinstance(dataset, EvaluationScores) else None
    bb = world.backbone
    tf = bb.temporal_factor
    total_lat = cfg.history_frames + cfg.chunks * cfg.chunk_frames
    with ctx.console.status(f"reading {cfg.trajectories} held-out trajectories of {total_lat} latent frames "
                            f"({recipe.data.source})"):
        data = dataset.latents("heldout", cfg.trajectories, total_lat, bb, ctx.run_dir / "cache", ctx.cache_key(),
                               device=device, keep_frames=True)
    n = len(data)
    prompt_text, null_text = text_embeddings(world, dataset.prompt, n, device)
    text = clips_text(data, prompt_text, device)  # the clips' own captions, when they have them
    history = data.latents[:, :, :cfg.history_frames].to(device)
    camera = data.camera.frames(slice(tf - 1, None))  # video rate, T = 1 + tf*(F-1)
    h_video = video_frames_for(cfg.history_frames, tf)
    truth = data.frames[:, h_video:]
    last_history = data.frames[:, h_video - 1:h_video]
    per_chunk = cfg.chunk_frames * tf
    sampler = sampler_for(ctx, cfg.init, cfg.steps, cfg.shift, cfg.cfg_scale, cfg.history_sigma)
    total_chunks = cfg.chunks + (scorer.extra_chunks(n) if scorer is not None else 0)
    if sampler.student and cfg.compare_teacher:
        total_chunks += cfg.chunks

    metrics: dict = {"trajectories": n, "history_latent_frames": cfg.history_frames, "chunks": cfg.chunks,
                     "chunk_latent_frames": cfg.chunk_frames, "steps": sampler.steps, "cfg_scale": sampler.cfg_scale,
                     "sampler": sampler.describe(), "attention": recipe.model.attention,
                     "nfe_per_chunk": sampler.nfe_per_chunk,
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}
    with progress_bar(ctx.console, "evaluate (chunks)", total_chunks) as update:
        def roll(model, how, cam=camera):
            return rollout_video(model, text, null_text, history, cam, cfg.chunks, cfg.chunk_frames, how, cfg.seed,
                                 on_chunk=lambda _i: update())

        evaluation = EvaluationRun(world, sampler, text, null_text, data, camera, h_video, per_chunk, roll,
                                   lambda: update())

        def judged(video):
            return scorer.rollout_scores(evaluation, video, camera) if scorer is not None else {}

        correct = roll(world, sampler)
        metrics.update(quality_scores(correct, truth, per_chunk))
        metrics.update({k: v for k, v in quality_scores(last_history.expand_as(truth), truth, per_chunk,
                                                        "copy_last_frame_").items() if "chunk" in k or k.endswith("psnr")})
        metrics.update(judged(correct))
        if scorer is not None:
            metrics.update(scorer.dataset_scores(evaluation))
        teacher_path = weights_metadata(ctx, cfg.init).get("teacher") if sampler.student else None
        if cfg.compare_teacher and teacher_path:
            metrics.update(teacher_scores(ctx, cfg, Path(teacher_path), metrics,
                                          lambda video: (quality_scores(video, truth, per_chunk), judged(video)), roll,
                                          scorer))

    own = scorer.summary(metrics) if scorer is not None else ""
    ctx.console.print(f"evaluate: PSNR chunk 1 {metrics['psnr_chunk1']:.2f} dB, chunk {cfg.chunks} "
                      f"{metrics[f'psnr_chunk{cfg.chunks}']:.2f} dB" + (f"; {own}" if own else ""), highlight=False)
    strip = [torch.cat([data.frames[0, :h_video], truth[0]]), torch.cat([data.frames[0, :h_video], as_uint8(correct[0])])]
    if cfg.write_report:
        from biwm.core.report import write_report

        write_report(stage_dir, metrics, title=f"{recipe.name}: evaluation", strip=strip, strip_every=per_chunk)
    if getattr(ctx, "log_with", None):  # the strip image is built only for a tracker
        from biwm.core.video import strip_grid

        headline = scorer.headline if scorer is not None else ()
        ctx.log({"evaluate/psnr": metrics["psnr"],
                 **{f"evaluate/{k}": metrics[k] for k in headline if metrics.get(k) is not None},
                 "evaluate/samples": strip_grid(strip, per_chunk, max(1, 96 // strip[0].shape[-1]))}, step=0)
    return metrics


def teacher_scores(ctx, cfg: EvaluateConfig, path: Path, student: dict, score, roll, scorer=None) -> dict:
    """The distilled generator's teacher on the same trajectories: teacher_* metrics, and the
    student's own under student_* names, side by side. ``roll(model, sampler)`` rolls out the
    evaluation's trajectories; ``score(video)`` gives (quality_scores, the dataset's rollout scores),
    of which the dataset's ``scorer`` names those to compare (``teacher_keys``, ``headline``)."""
    from biwm.core.evaluation import Sampler
    from biwm.core.stages.common import load_world_model

    if not path.is_file():
        ctx.console.print(f"[yellow]teacher weights {path} not found; no teacher comparison[/]")
        return {}
    teacher = load_world_model(ctx, init=path).to(ctx.device).eval()
    sampler = Sampler(cfg.teacher_steps, cfg.shift, cfg.teacher_cfg, history_sigma=cfg.teacher_history_sigma)
    ctx.console.print(f"teacher: {sampler.describe()}")
    quality, own = score(roll(teacher, sampler))
    teacher_keys, headline = (scorer.teacher_keys, scorer.headline) if scorer is not None else ((), ())
    return {"teacher_psnr": quality["psnr"], "teacher_psnr_per_chunk": quality["psnr_per_chunk"],
            "teacher_ssim": quality["ssim"], "teacher_sharpness": quality["sharpness"],
            **{f"teacher_{k}": own.get(k) for k in teacher_keys},
            "teacher_nfe_per_chunk": sampler.nfe_per_chunk, "teacher_sampler": sampler.describe(),
            "student_psnr": student["psnr"], "student_ssim": student["ssim"], "student_sharpness": student["sharpness"],
            **{f"student_{k}": student.get(k) for k in headline}, "student_nfe_per_chunk": student["nfe_per_chunk"]}
