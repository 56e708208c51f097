"""Stage 2, ``distill``: a few-step generator from the stage-1 model by DMD on its own rollouts
(METHODS.md §3, :mod:`biwm.core.dmd`).

Three networks start from the stage-1 weights: the generator (trained), the teacher (frozen, used
with CFG) and the critic (trained on the generator's samples; optionally LoRA on the teacher's
own base). Each iteration the generator rolls out ``chunks`` chunks on its own history from a
true toy-world history, with one random exit step. The critic and every loss's critic term step
every iteration; the generator every ``generator_every``-th (two time-scale rule), followed by
its EMA. The stage's ``model.safetensors`` is the EMA generator; its metadata tells ``generate``
and ``evaluate`` to sample with the student's steps and no CFG. A quantizer with ``self_distill`` > 0
adds its BF16-teacher -> quantised-student term to the generator's loss (:mod:`biwm.core.selfdistill`:
the teacher is the generator's own weights run unquantised, not the stage's frozen teacher), logged
as ``distill/self_distill``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from biwm.core.config import InputFile, PluginRef, Strict

if TYPE_CHECKING:
    from biwm.core.dmd import DistillStep
    from biwm.core.selfdistill import SelfDistill
    from biwm.core.text import TextConditioning
    from biwm.core.window import WorldModel


class DistillConfig(Strict):
    stage: Literal["distill"] = "distill"
    steps: int = Field(200, ge=1, description="iterations (critic updates)")
    batch_size: int = Field(4, ge=1)
    history_frames: int = Field(4, ge=1, description="true history latent frames the rollout starts from")
    chunks: int = Field(3, ge=1, description="chunks the generator rolls out on its own history per iteration")
    chunk_frames: int = Field(4, ge=1, description="latent frames per chunk (K)")
    student_steps: int = Field(4, ge=1, description="denoising steps of the distilled generator")
    student_shift: float = Field(5.0, gt=0, description="shift warping the student's evenly spaced timesteps")
    history_sigma: float = Field(0.0, ge=0, lt=1, description="noise the student's history to this level in its "
                                 "rollouts and at inference (for a teacher trained with history_sigma_max; 0: clean)")
    generator_every: int = Field(5, ge=1, description="generator update every N critic updates")
    generator_lr: float = Field(1e-5, gt=0)
    critic_lr: float = Field(2e-6, gt=0)
    betas: tuple[float, float] = (0.0, 0.999)
    grad_clip: float = Field(10.0, gt=0)
    teacher_cfg: float = Field(3.0, ge=0, description="teacher's classifier-free guidance (text and control)")
    timestep_shift: float = Field(5.0, gt=0, description="shift of the noise levels of the DMD and critic losses")
    sigma_min: float = Field(0.02, ge=0, le=1, description="lowest noise level of the DMD and critic losses "
                             "(flow-matching sigma, whatever the backbone's timestep convention)")
    sigma_max: float = Field(0.98, ge=0, le=1, description="highest noise level of the DMD and critic losses")
    ema: float | None = Field(0.99, gt=0, lt=1, description="EMA decay of the generator (null: no EMA)")
    critic: Literal["full", "lora"] = Field("full", description="a full copy, or LoRA on the teacher's frozen base")
    lora_rank: int = Field(16, ge=1)
    lora_targets: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
                                    description="linear layers that get LoRA adapters (module names)")
    losses: list[PluginRef] = Field(default_factory=lambda: [PluginRef(name="dmd")], min_length=1)
    checkpoint_every: int = Field(50, ge=1)
    init: InputFile | None = Field(None, description="start from this biwm model.safetensors (default: previous stage)")
    generator_init: InputFile | None = Field(
        None, description="start the generator from this model.safetensors (e.g. a distilled student, to go on "
                          "distilling it) instead of the teacher; the teacher and critic still start from init")

    @model_validator(mode="before")
    @classmethod
    def _timestep_names(cls, data: Any) -> Any:
        """Recipes written before the noise range moved to sigma units said ``t_min``/``t_max`` out of 1000
        (Wan's timestep): read them as ``sigma_min``/``sigma_max``, so saved runs still resume."""
        if isinstance(data, dict) and ("t_min" in data or "t_max" in data):
            data = dict(data)
            for old, new in (("t_min", "sigma_min"), ("t_max", "sigma_max")):
                if old in data:
                    if new in data:
                        raise ValueError(f"{old} and {new} name the same setting; give only {new} (a noise level "
                                         f"in [0, 1]; {old} was out of 1000)")
                    value = data.pop(old)
                    data[new] = value / 1000 if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        else value
        return data

    def check(self, recipe) -> list[str]:
        from biwm.core.plugins import UnknownPluginError, get_plugin_manager

        errors = [f"betas[{i}]: {b} is not in [0, 1), which Adam's moment decay needs"
                  for i, b in enumerate(self.betas) if not 0 <= b < 1]
        if self.sigma_min >= self.sigma_max:
            errors.append(f"sigma_min ({self.sigma_min:g}) must be below sigma_max ({self.sigma_max:g})")
        names = [ref.name for ref in self.losses]
        if "dmd" not in names:
            errors.append("losses: the distill stage needs 'dmd' (the other losses refine it)")
        for i, name in enumerate(names):
            try:
                factory = get_plugin_manager().get("loss", name).factory
            except UnknownPluginError:
                continue  # reported with the plugin references
            missing = [need for need in getattr(factory, "requires", ()) if need not in names]
            if missing:
                errors.append(f"losses[{i}]: {name!r} needs {', '.join(map(repr, missing))} in the same stage's losses")
        return errors


class Distiller:
    """The stage's three networks, their optimisers and losses, and one iteration (what the stage
    loops over and ``benchmarks/train.py`` times)."""

    def __init__(self, cfg: DistillConfig, load: Callable[[bool], WorldModel],
                 make_losses: Callable[[object], list], device: torch.device, attention: str | None = None,
                 load_generator: Callable[[bool], WorldModel] | None = None, acc=None,
                 self_distill: SelfDistill | None = None):
        """``load(report)`` builds a world model with the stage-1 weights; ``make_losses(backbone)``
        the stage's losses, given the critic's backbone; ``load_generator`` the generator's start
        (default: ``load``, the teacher's weights). ``acc``: an ``accelerate.Accelerator`` under FSDP2
        (see :mod:`biwm.core.sharded`): the generator and the critic are each prepared with their
        optimizer, the frozen teacher alone (a LoRA critic is the teacher's prepared base with its
        adapters), and every batch is this rank's share of the global batch. ``self_distill``: the
        quantizer's term, added to every generator update."""
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.cfg, self.attention = cfg, attention
        self.part: tuple[int, int] | None = None  # (rank, processes) under FSDP2
        self.self_distill = self_distill
        self.generator = (load_generator or load)(True).to(device).train()
        self.teacher = load(False).to(device).eval().requires_grad_(False)
        self.teacher_context: Callable = nullcontext
        if cfg.critic == "lora":
            from biwm.core.lora import adapters_disabled, add_lora

            base = self.teacher.backbone.trainable()
            self.critic_params = add_lora(base, cfg.lora_rank, cfg.lora_targets)
            self.critic = self.teacher  # adapters on: the critic; adapters off: the teacher
            self.teacher_context = lambda: adapters_disabled(base)
        else:
            self.critic = load(False).to(device).train()
            self.critic_params = list(self.critic.parameters())
        self.losses = [loss.to(device) for loss in make_losses(self.critic.backbone)]
        for loss in self.losses:
            if hasattr(loss, "bind"):
                loss.bind(self.losses)
        self.critic_params += [p for loss in self.losses if isinstance(loss, nn.Module) for p in loss.parameters()]
        self.opt_g = torch.optim.AdamW([p for p in self.generator.parameters() if p.requires_grad],
                                       lr=cfg.generator_lr, betas=cfg.betas)
        self.opt_c = torch.optim.AdamW(self.critic_params, lr=cfg.critic_lr, betas=cfg.betas)
        if acc is not None:
            self._shard(acc)
            return
        # EMA over what the generator trains (transformer, controls, compressor), not the codec it carries
        self.trained = nn.ModuleDict(self.generator.trainable_modules())
        self.ema = (AveragedModel(self.trained, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
                    if cfg.ema else None)

    def _shard(self, acc) -> None:
        """Prepare the three networks for FSDP2 (accelerate takes one model per ``prepare``)."""
        from biwm.core import sharded as fsdp

        # losses with parameters of their own (gan's head) train with the critic: they become submodules of the
        # critic, so its optimizer is prepared with them, each its own unit (WorldModel._no_split_modules),
        # gathered around its forward (the head reads the critic's hidden states there)
        with_params = [loss for loss in self.losses
                       if isinstance(loss, nn.Module) and any(True for _ in loss.parameters())]
        if with_params:
            self.critic.loss_heads = nn.ModuleList(with_params)
        for world in (self.generator, self.teacher) + (() if self.critic is self.teacher else (self.critic,)):
            fsdp.prepare_plugin(acc, world)

        def prepare(*args):
            fsdp.fsdp_on_cpu(acc)  # on the CPU, accelerate's prepare resets the state to plain MULTI_CPU each time
            out = acc.prepare(*args)
            fsdp.register_window_forwards(args[0])
            return out

        self.generator, self.opt_g = prepare(self.generator, self.opt_g)
        if self.critic is self.teacher:  # LoRA: the teacher's sharded base carries the critic's adapters
            self.teacher, self.opt_c = prepare(self.teacher, self.opt_c)
            self.critic = self.teacher
        else:
            self.critic, self.opt_c = prepare(self.critic, self.opt_c)
            self.teacher = prepare(self.teacher)
        # FSDP2 replaced the parameters by their shards: the optimizers' groups now hold the shards
        self.critic_params = [p for group in self.opt_c.param_groups for p in group["params"]]
        self.part = (acc.process_index, acc.num_processes)
        self.trained = nn.ModuleDict(self.generator.trainable_modules())
        self.ema = fsdp.ShardedEMA(self.trained, self.cfg.ema) if self.cfg.ema else None

    def sharded_parts(self) -> dict:
        """Under FSDP2, what a sharded checkpoint holds: the generator and the critic with their optimizers
        (the full-copy critic's teacher is frozen: loaded again from the stage-1 weights)."""
        return {"generator": (self.generator, self.opt_g), "critic": (self.critic, self.opt_c)}

    def modules(self) -> dict[str, nn.Module]:
        """What a one-process checkpoint holds."""
        out = {f"generator.{k}": m for k, m in self.generator.trainable_modules().items()}
        out.update({f"critic.{k}": m for k, m in self.critic.trainable_modules().items()})
        out.update({f"loss{i}": m for i, m in enumerate(self.losses) if isinstance(m, nn.Module)})
        if self.ema is not None:
            out["ema"] = self.ema
        return out

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.opt_g, "critic": self.opt_c}

    def iteration(self, it: int, clips: Tensor, camera, text: TextConditioning, null_text: TextConditioning,
                  sigmas: Tensor, rng: torch.Generator,
                  exit_step: int | None = None) -> tuple[Tensor | None, Tensor, int]:
        """One iteration on true clips [B, C, F, h, w] (history then the chunks' true continuation):
        the generator's self-rollout, its update every ``generator_every``-th iteration (then the
        EMA), and the critic's update. ``exit_step`` fixes the backward-simulation exit (default:
        drawn from ``rng``). Returns (generator loss or None, critic loss, exit step)."""
        from biwm.core.dmd import DistillStep, RolledChunk, sample_timestep, self_rollout
        from biwm.core.window import Window

        cfg = self.cfg
        batch = clips.shape[0]
        device = clips.device
        tf = self.generator.backbone.temporal_factor
        history = clips[:, :, :cfg.history_frames]
        drawn = int(torch.randint(cfg.student_steps, (1,), generator=rng))
        exit_step = drawn if exit_step is None else exit_step
        train_generator = it % cfg.generator_every == 0
        with torch.set_grad_enabled(train_generator):
            rolled = self_rollout(self.generator, text, history, camera, cfg.chunks, cfg.chunk_frames, sigmas, rng,
                                  exit_step, self.attention, cfg.history_sigma, self.part)

        def real_chunk(c: int) -> RolledChunk:
            """The true chunk c after its true history, in the window of the same length."""
            start = cfg.history_frames + c * cfg.chunk_frames
            end = start + cfg.chunk_frames
            window = Window(text=text, chunk=clips[:, :, start:end], timestep=clips.new_zeros(batch),
                            history=clips[:, :, :start], camera=camera.frames(slice(0, end * tf)),
                            attention=self.attention)
            return RolledChunk(clips[:, :, start:end], window)

        def steps(detach: bool) -> list[DistillStep]:
            out = []
            for c, chunk in enumerate(rolled):
                if detach:
                    chunk = RolledChunk(chunk.latents.detach(), chunk.window)
                sigma = sample_timestep(batch, cfg.timestep_shift, cfg.sigma_min, cfg.sigma_max, rng,
                                        self.part).to(device)
                out.append(DistillStep(chunk, self.teacher, self.critic, null_text, cfg.teacher_cfg, sigma,
                                       cfg.timestep_shift, rng, self.teacher_context, real=real_chunk(c),
                                       part=self.part))
            return out

        loss_g = None
        if train_generator:
            generator_steps = steps(detach=False)
            for step in generator_steps:
                for loss in self.losses:
                    if hasattr(loss, "prepare"):
                        loss.prepare(step)
            loss_g = _total(self.losses, generator_steps, "generator_loss")
            if self.self_distill is not None:
                loss_g = loss_g + self._self_distill(generator_steps)
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            # under FSDP2 the gradients are DTensor shards: the norm is over every rank's shards
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), cfg.grad_clip)
            self.opt_g.step()
            if self.ema is not None:
                self.ema.update_parameters(self.trained)
        loss_c = _total(self.losses, steps(detach=True), "critic_loss")
        self.opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        torch.nn.utils.clip_grad_norm_(self.critic_params, cfg.grad_clip)
        self.opt_c.step()
        return loss_g, loss_c, exit_step

    def _self_distill(self, steps: list[DistillStep]) -> Tensor:
        """The quantizer's self-distillation term, averaged over the chunks: each generated chunk
        (detached) re-noised with fresh noise to its DMD noise level, the generator's quantised
        forward there against its own full-precision one."""
        from biwm.core.dmd import randn
        from biwm.core.schedule import add_noise

        total = None
        for step in steps:
            x0 = step.chunk.latents.detach()
            x_t = add_noise(x0, randn(x0.shape, step.generator, x0.device, self.part), step.sigma)
            window = step.chunk.window.with_chunk(x_t, self.generator.backbone.timestep(step.sigma))
            term = self.self_distill(self.generator, window, step.sigma)
            total = term if total is None else total + term
        return total / len(steps)


def run(ctx, cfg: DistillConfig, stage_dir: Path) -> dict:
    from biwm.core import sharded as fsdp
    from biwm.core.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, save_weights
    from biwm.core.dmd import student_sigmas
    from biwm.core.plugins import get_plugin_manager
    from biwm.core.runner import progress_bar
    from biwm.core.selfdistill import SelfDistill
    from biwm.core.stages.common import clips_text, load_world_model, text_embeddings, training_batches

    recipe = ctx.recipe
    device = ctx.device
    acc = ctx.accelerator
    sharded = fsdp.training_sharded(acc, "distill")  # else one process: none of the FSDP2 code runs
    if sharded:
        fsdp.batch_share(cfg.batch_size, acc)  # the global batch splits evenly, or a clear error now
        device = acc.device
    torch.manual_seed(recipe.seed)
    strict = cfg.init is None  # an explicit init may come from a model with other controls or compressor
    pm = get_plugin_manager()
    index = recipe.stages.index(cfg)

    def make_losses(backbone) -> list:
        return [pm.get("loss", ref.name).create(recipe.resolved[f"stages[{index}].losses[{i}]"], backbone=backbone)
                for i, ref in enumerate(cfg.losses)]

    load_generator = None
    if cfg.generator_init is not None:
        _warn_schedule_change(ctx, cfg)

        def load_generator(report: bool):
            return load_world_model(ctx, init=cfg.generator_init, strict=False, report=report)

    nets = Distiller(cfg, lambda report: load_world_model(ctx, init=cfg.init, strict=strict, report=report),
                     make_losses, device, load_generator=load_generator, acc=acc if sharded else None,
                     self_distill=SelfDistill.from_recipe(recipe))
    if sharded:
        ctx.console.print(fsdp.describe(nets.generator, acc), highlight=False)

    dataset = ctx.dataset
    tf = nets.generator.backbone.temporal_factor
    latent_frames = 1 + (dataset.frames - 1) // tf
    if cfg.history_frames + cfg.chunks * cfg.chunk_frames > latent_frames:
        raise ValueError(f"stage distill: history_frames + chunks * chunk_frames = "
                         f"{cfg.history_frames + cfg.chunks * cfg.chunk_frames} latent frames, but data clips of "
                         f"{dataset.frames} frames have {latent_frames}; raise data.frames or lower chunks")
    draw = training_batches(ctx, cfg.batch_size, latent_frames, nets.generator.backbone, device)
    prompt_text, null_text = text_embeddings(nets.generator, dataset.prompt, cfg.batch_size // acc.num_processes,
                                             device)
    sigmas = student_sigmas(cfg.student_steps, cfg.student_shift, device)
    rng = torch.Generator().manual_seed(recipe.seed + 2)

    ckpt_dir = stage_dir / "checkpoints"
    it, counts = 0, {"generator_updates": 0, "critic_updates": 0}
    if ctx.resume and (ckpts := list_checkpoints(ckpt_dir)):
        if sharded:
            meta = fsdp.load_sharded_checkpoint(ckpts[-1], nets.sharded_parts(), None, rng, acc,
                                                tensors=nets.ema.shadow if nets.ema is not None else None)
            if nets.ema is not None:
                nets.ema.updates = meta["extra"]["counts"]["generator_updates"]
        else:
            meta = load_checkpoint(ckpts[-1], nets.modules(), nets.optimizers(), rng)
        it, counts = meta["step"], meta["extra"]["counts"]
        ctx.console.print(f"resumed distill from {ckpts[-1].name} (iteration {it})")

    history_g: list[float] = []
    history_c: list[float] = []
    history_sd: list[float] = []  # the self-distillation term of each generator update
    started = time.time()
    with progress_bar(ctx.console, "distill", cfg.steps, completed=it) as update:
        while it < cfg.steps:
            batch, idx = draw(rng)
            clips = batch.latents[idx].to(device)
            camera = batch.camera.select(idx).to(device)
            text = clips_text(batch, prompt_text, device, idx)
            loss_g, loss_c, exit_step = nets.iteration(it, clips, camera, text, null_text, sigmas, rng)
            if sharded:  # the global batch's losses: the mean of the ranks' (equal) shares
                loss_c = acc.reduce(loss_c.detach(), "mean")
                loss_g = None if loss_g is None else acc.reduce(loss_g.detach(), "mean")
            if loss_g is not None:
                counts["generator_updates"] += 1
                history_g.append(_finite(loss_g.item(), "generator", it, cfg))
                if nets.self_distill is not None:
                    term = nets.self_distill.take()
                    history_sd.append(float(acc.reduce(term, "mean") if sharded else term))
            counts["critic_updates"] += 1
            history_c.append(_finite(loss_c.item(), "critic", it, cfg))
            it += 1
            update(critic=sum(history_c[-20:]) / len(history_c[-20:]), exit=exit_step)
            ctx.log({"distill/critic_loss": history_c[-1], "distill/exit_step": exit_step,
                     "distill/generator_lr": nets.opt_g.param_groups[0]["lr"],
                     "distill/critic_lr": nets.opt_c.param_groups[0]["lr"],
                     **({"distill/generator_loss": history_g[-1]} if loss_g is not None else {}),
                     **({"distill/self_distill": history_sd[-1]} if loss_g is not None and history_sd else {})},
                    step=it)
            if it % cfg.checkpoint_every == 0 and it < cfg.steps and sharded:  # every rank writes its shards
                fsdp.save_sharded_checkpoint(ckpt_dir, it, nets.sharded_parts(), None, {"counts": counts}, rng, acc,
                                             tensors=nets.ema.shadow if nets.ema is not None else None)
            elif it % cfg.checkpoint_every == 0 and it < cfg.steps:
                save_checkpoint(ckpt_dir, it, nets.modules(), nets.optimizers(), {"counts": counts}, rng)

    distilled = {"distill_self_distill_last": history_sd[-1]} if history_sd else {}
    if sharded:
        return {**_finish_sharded(ctx, cfg, nets, stage_dir, it, counts, history_g, history_c, started, acc),
                **distilled}
    final = dict(nets.ema.module.items()) if nets.ema is not None else nets.generator.trainable_modules()
    for what, modules in (("generator", final), ("critic", nets.critic.trainable_modules())):
        bad = [f"{name}.{k}" for name, m in modules.items() for k, p in m.named_parameters()
               if not bool(torch.isfinite(p).all())]
        if bad:  # the last update is not followed by a loss that would show it
            raise FloatingPointError(f"distill {what} weights hold NaN or inf after iteration {it} "
                                     f"({len(bad)} tensors, e.g. {', '.join(bad[:2])}); {_blame(cfg, what)}")
    model_file = stage_dir / "model.safetensors"
    save_weights(model_file, final, _model_metadata(ctx, cfg, model_file))
    return {**_metrics(cfg, it, counts, history_g, history_c, started), **distilled}


def _model_metadata(ctx, cfg: DistillConfig, model_file: Path) -> dict[str, str]:
    """The distilled model's metadata: how to sample it, and its teacher relative to the model file (so a
    run folder that moves keeps its teacher)."""
    from biwm.core.stages.common import model_card

    teacher_weights = cfg.init or ctx.previous_weights
    teacher = os.path.relpath(Path(teacher_weights).resolve(), model_file.parent.resolve()) if teacher_weights else ""
    card = model_card(ctx, "distill", {"steps": cfg.student_steps, "shift": cfg.student_shift, "student": True,
                                       "history_sigma": cfg.history_sigma})
    return {"stage": "distill", "student_steps": str(cfg.student_steps), "student_shift": str(cfg.student_shift),
            "student_history_sigma": str(cfg.history_sigma), "teacher": teacher, **card}


def _metrics(cfg: DistillConfig, it: int, counts: dict, history_g: list[float], history_c: list[float],
             started: float) -> dict:
    return {"distill_iterations": it, **counts,
            "distill_generator_loss_last": history_g[-1] if history_g else None,
            "distill_critic_loss_last": sum(history_c[-10:]) / max(1, len(history_c[-10:])) if history_c else None,
            "distill_seconds": round(time.time() - started, 1), "student_steps": cfg.student_steps}


def _finish_sharded(ctx, cfg: DistillConfig, nets: Distiller, stage_dir: Path, it: int, counts: dict,
                    history_g: list[float], history_c: list[float], started: float, acc) -> dict:
    """Under FSDP2: the EMA (or the generator) gathered in full on rank 0, which alone checks and writes it."""
    from biwm.core import sharded as fsdp
    from biwm.core.checkpoint import save_weights

    trained = nets.trained
    fsdp.reshard(nets.generator)  # its last rollout may have run without a backward
    if nets.ema is not None:
        nets.ema.copy_to(trained)  # the generator is not used after this
    weights = fsdp.full_weights(nets.generator, trained, acc)
    if acc.is_main_process:
        bad = [key for key, value in weights.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
        if bad:
            raise FloatingPointError(f"distill generator weights hold NaN or inf after iteration {it} "
                                     f"({len(bad)} tensors, e.g. {', '.join(bad[:2])}); {_blame(cfg, 'generator')}")
        model_file = stage_dir / "model.safetensors"
        save_weights(model_file, {}, _model_metadata(ctx, cfg, model_file), weights=weights)
    return _metrics(cfg, it, counts, history_g, history_c, started)


def _warn_schedule_change(ctx, cfg: DistillConfig) -> None:
    """A generator that starts from a distilled model was distilled for its own steps and shift; a
    stage that trains it on others changes what it does (allowed, but said, with both)."""
    from biwm.core.stages.common import model_metadata

    meta = model_metadata(cfg.generator_init)
    if meta.get("stage") != "distill":
        return
    was = (int(meta["student_steps"]), float(meta["student_shift"]))
    if was != (cfg.student_steps, cfg.student_shift):
        ctx.console.print(f"[yellow]generator_init {cfg.generator_init} was distilled for {was[0]} steps at shift "
                          f"{was[1]:g}; this stage trains it for student_steps {cfg.student_steps} at student_shift "
                          f"{cfg.student_shift:g}[/]", highlight=False)


def _total(losses, steps, side: str) -> torch.Tensor:
    """Mean over chunks of the sum over losses of one side's terms."""
    total = None
    for step in steps:
        for loss in losses:
            term = getattr(loss, side)(step)
            if term is not None:
                total = term if total is None else total + term
    if total is None:
        raise ValueError(f"no loss contributed a {side.replace('_', ' ')}")
    return total / len(steps)


def _blame(cfg: DistillConfig, side: str) -> str:
    """The settings that can make a distill loss or weights diverge, as they stand, the unusual first."""
    lr = f"generator_lr: {cfg.generator_lr:g}" if side == "generator" else f"critic_lr: {cfg.critic_lr:g}"
    unusual = []
    if cfg.teacher_cfg > 10:
        unusual.append(f"teacher_cfg: {cfg.teacher_cfg:g} (usually 1-5)")
    if cfg.grad_clip > 100:
        unusual.append(f"grad_clip: {cfg.grad_clip:g} (usually 1-10)")
    if cfg.student_shift > 20 or cfg.timestep_shift > 20:
        unusual.append(f"student_shift: {cfg.student_shift:g}, timestep_shift: {cfg.timestep_shift:g} (usually 3-8)")
    if (cfg.generator_lr if side == "generator" else cfg.critic_lr) > 1e-3:
        unusual.insert(0, lr + " (usually 1e-6 to 1e-4)")
    if unusual:
        return "check stages.distill " + "; ".join(unusual)
    return f"check stages.distill {lr}, teacher_cfg: {cfg.teacher_cfg:g}, or the stage-1 model it starts from"


def _finite(value: float, side: str, it: int, cfg: DistillConfig) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(f"distill {side} loss is {value} at iteration {it}; {_blame(cfg, side)}")
    return value
