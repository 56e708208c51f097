"""Helpers shared by the stages: building the model from the previous stage, seeding, text."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, ValidationError

from biwm.core.checkpoint import CorruptFileError, load_model_tensors, load_module_state, read_metadata
from biwm.core.config import Strict
from biwm.core.text import TextConditioning
from biwm.core.window import WorldModel

if TYPE_CHECKING:
    from biwm.core.data import LatentClips
    from biwm.core.runner import RunContext


def load_world_model(ctx: "RunContext", init: Path | None = None, strict: bool = True,
                     report: bool = True) -> WorldModel:
    """The recipe's model, with weights from ``init`` or else the previous training stage.

    Not strict (an explicit ``init``, e.g. secondary fine-tuning with another control or
    compressor): matching weights load, the rest keep their fresh (zero-initialised) values, and
    missing, unexpected and mismatched names are printed."""
    world = ctx.build_world_model()
    source = init or ctx.previous_weights
    if source is not None:
        found = load_module_state(world.trainable_modules(), load_model_tensors(source), strict=strict,
                                  source=str(source))
        for kind, names in found.items():
            if names and report:
                ctx.console.print(f"[yellow]init {source}: {len(names)} {kind}[/] ({', '.join(names[:4])}"
                                  f"{' ...' if len(names) > 4 else ''})")
    return world


def text_embeddings(world: WorldModel, prompt: str, batch: int,
                    device: torch.device) -> tuple[TextConditioning, TextConditioning]:
    """``prompt``'s conditioning for a batch of ``batch``, and the empty prompt's (one row: the null
    condition of classifier-free guidance)."""
    text = world.backbone.encode_text([prompt]).to(device)
    null = world.backbone.encode_text([""]).to(device)
    return text.expand(batch), null


def training_batches(ctx: "RunContext", batch_size: int, latent_frames: int, backbone, device: torch.device,
                     resident: bool = False) -> Callable[[torch.Generator], tuple["LatentClips", torch.Tensor]]:
    """How a training stage reads the dataset's training split: ``draw(generator) -> (clips, rows)``,
    the batch being rows ``rows`` of ``clips``. ``batch_size`` is the global batch: with several
    processes each gets its own share of it. A dataset that streams
    (:class:`biwm.core.protocols.StreamedClips`, e.g. from its latent cache) gives each batch as it
    is needed, this rank's share of the clips, every clip once per pass (``rows`` all of the batch,
    in order, the generator untouched); otherwise every training clip is read (and encoded) now, kept
    on ``device`` when ``resident``, and ``rows`` drawn from ``generator`` with replacement: the global
    batch, the same on every rank (the generator is), of which each rank keeps its consecutive share."""
    from biwm.core.protocols import StreamedClips

    dataset, source = ctx.dataset, ctx.recipe.data.source
    acc = ctx.accelerator
    share = slice(None)
    if acc.num_processes > 1:
        from biwm.core.sharded import batch_share

        share = batch_share(batch_size, acc)
    stream = None
    if isinstance(dataset, StreamedClips):  # this process's share
        stream = dataset.train_batches(batch_size // acc.num_processes, latent_frames, backbone, ctx.cache_key(),
                                       ctx.recipe.seed, acc.process_index, acc.num_processes)
    if stream is not None:
        ctx.console.print(f"streaming {dataset.train_clips} training clips from the {source} dataset's latent cache")
        rows = torch.arange(batch_size // acc.num_processes)
        return lambda _generator: (next(stream), rows)
    with ctx.console.status(f"reading and encoding {dataset.train_clips} training clips ({source})"):
        data = dataset.latents("train", dataset.train_clips, latent_frames, backbone, ctx.run_dir / "cache",
                               ctx.cache_key(), device=device)
    if resident:
        data = data.to(device)  # a step gathers its windows where they are
    return lambda generator: (data, torch.randint(len(data), (batch_size,), generator=generator)[share])


def clips_text(clips: "LatentClips", prompt_text: TextConditioning, device: torch.device,
               rows: torch.Tensor | None = None) -> TextConditioning:
    """The text conditioning of ``clips`` (of its rows ``rows``, None: all in order): their own captions'
    (:attr:`LatentClips.text`) when they carry it, else ``prompt_text`` (the dataset's one prompt, made
    by :func:`text_embeddings` for the batch), unchanged."""
    if clips.text is None:
        return prompt_text
    text = clips.text if rows is None else clips.text.select(rows.to(clips.text[clips.text.names[0]].embeds.device))
    return text.to(device, non_blocking=True)


class DistilledModel(Strict):
    """What the distill stage records in its model's metadata, checked like a recipe when read."""

    stage: Literal["distill"]
    student_steps: int = Field(ge=1, le=1000)
    student_shift: float = Field(gt=0)
    student_history_sigma: float = Field(0.0, ge=0, lt=1)
    teacher: str = Field("", description="the teacher's model file, relative to this one (or absolute)")


def model_metadata(path: Path) -> dict[str, str]:
    """A biwm model file's metadata (its header only), checked: a distilled model's fields must be
    valid, and its teacher (returned as an absolute path) readable where it exists: a student copied
    without its teacher still evaluates and plays, without the teacher comparison. CorruptFileError
    names the file."""
    path = Path(path)
    meta = read_metadata(path, "model file")
    if meta.get("stage") != "distill":
        return meta
    try:
        distilled = DistilledModel.model_validate({k: v for k, v in meta.items() if k in DistilledModel.model_fields})
    except ValidationError as exc:
        from biwm.core.recipe import show

        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')} "
                             f"(got {show(e.get('input'))})" for e in exc.errors(include_url=False))
        raise CorruptFileError(f"{path}: metadata of a distilled model is invalid: {problems}") from None
    if distilled.teacher:
        teacher = Path(os.path.normpath(path.parent / distilled.teacher))
        if teacher.exists():  # a student moved without its teacher still samples; only a comparison needs it
            read_metadata(teacher, f"teacher model file (named by {path})")
        meta["teacher"] = str(teacher)
    return meta


def weights_metadata(ctx: "RunContext", init: Path | None) -> dict[str, str]:
    """Checked metadata of the weights a stage would load (``init`` or the previous training stage's)."""
    source = init or ctx.previous_weights
    return model_metadata(source) if source is not None else {}


def sampler_for(ctx: "RunContext", init: Path | None, steps: int, shift: float, cfg_scale: float,
                history_sigma: float = 0.0):
    """The stage's sampler, unless the weights are a distilled generator: then its own few steps,
    no CFG, and the history noise it was distilled with (recorded in the weights' metadata by the
    distill stage)."""
    from biwm.core.evaluation import Sampler

    meta = weights_metadata(ctx, init)
    if meta.get("stage") == "distill":
        sampler = Sampler(int(meta["student_steps"]), float(meta["student_shift"]), 1.0, student=True,
                          history_sigma=float(meta.get("student_history_sigma", 0.0)))
        if meta.get("teacher") and ctx.run_dir.resolve() not in Path(meta["teacher"]).resolve().parents:
            ctx.console.print(f"[yellow]the distilled model's teacher is outside this run[/]: {meta['teacher']}",
                              highlight=False)
    else:
        sampler = Sampler(steps, shift, cfg_scale, history_sigma=history_sigma)
    ctx.console.print(f"sampling: {sampler.describe()}")
    return sampler


CARD_KEY = "biwm_card"  # safetensors metadata key of a model's card (JSON)


def model_card(ctx: "RunContext", stage: str, sampler: dict | None = None) -> dict[str, str]:
    """Metadata that makes a model file self-describing: the model (backbone with its options,
    controls, compressor, attention), the data it was trained on and how to sample it. ``biwm.core.load``
    and ``biwm eval FILE`` read it when no run's recipe.yaml is around."""
    import json

    snapshot = ctx.recipe.snapshot()
    if sampler is None:  # a teacher samples as its recipe's (last) evaluate stage says, when it has one
        evaluate = [s for s in ctx.recipe.stages if getattr(s, "stage", None) == "evaluate"]
        sampler = ({"steps": evaluate[-1].steps, "shift": evaluate[-1].shift, "cfg_scale": evaluate[-1].cfg_scale,
                    "history_sigma": evaluate[-1].history_sigma} if evaluate else {})
    card = {"format": 1, "name": snapshot["name"], "stage": stage, "model": snapshot["model"],
            "data": snapshot["data"], "sampler": sampler}
    return {CARD_KEY: json.dumps(card, sort_keys=True)}


def read_card(path: Path) -> dict | None:
    """The card of a model file, or None for a file saved without one. CorruptFileError names the file."""
    import json

    raw = read_metadata(Path(path), "model file").get(CARD_KEY)
    if raw is None:
        return None
    try:
        card = json.loads(raw)
    except ValueError:
        card = None
    if not isinstance(card, dict) or not {"model", "data"} <= set(card):
        raise CorruptFileError(f"{path}: its model card ({CARD_KEY} metadata) is not a BiWM model card")
    return card


def recipe_data_from_card(card: dict, run_dir: Path, weights: Path) -> dict:
    """An unvalidated recipe (for ``--set`` overrides) that evaluates ``weights`` as its card describes."""
    sampler = card.get("sampler") or {}
    evaluate = {"stage": "evaluate", "init": str(Path(weights).resolve())}
    if not sampler.get("student"):  # a distilled generator's own steps come from its metadata (sampler_for)
        evaluate.update({k: sampler[k] for k in ("steps", "shift", "cfg_scale", "history_sigma") if k in sampler})
    return {"name": card.get("name", "model"), "run_dir": str(run_dir), "data": card["data"], "model": card["model"],
            "stages": [evaluate]}
