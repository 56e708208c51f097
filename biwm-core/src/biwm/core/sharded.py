"""Training sharded over several processes with accelerate's FSDP2 (``accelerate launch --use_fsdp
--fsdp_version 2``, or ``examples/accelerate/fsdp2.yaml``): what a stage needs beyond ``accelerate.prepare``.

- Each process trains on its own share of a step's global batch (:func:`batch_share`).
- Checkpoints are sharded: every rank writes its shards of the weights and optimizer states through
  ``torch.distributed.checkpoint`` into one ``step_N`` folder, published (renamed) by rank 0 when all
  have written, beside ``state.json`` and one ``rng_R.safetensors`` per rank. ``--resume`` reads them
  back at the same number of processes.
- A stage's ``model.safetensors`` is the full state dict, gathered on rank 0 and written by it alone.

Nothing here runs in a single process: a stage calls it only when :func:`is_sharded` says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from biwm.core.checkpoint import (CHECKPOINT_PREFIX, TEMP_MARK, _own_checkpoints, _publish, _read_state,
                                  _state_digest, current_run_id, load_tensors, save_tensors)


def is_sharded(acc) -> bool:
    """True when ``acc`` (an ``accelerate.Accelerator``) trains under FSDP2."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP and bool(getattr(acc, "is_fsdp2", False))


def training_sharded(acc, stage: str) -> bool:
    """Whether a training ``stage`` runs under FSDP2: False in one process, True under FSDP2; several
    processes without FSDP2 are an error that says how to launch."""
    if acc.num_processes == 1 and acc.distributed_type != "FSDP":
        return False
    if not is_sharded(acc):
        raise ValueError(f"stage {stage}: several processes train only under FSDP2 (accelerate launch --use_fsdp "
                         "--fsdp_version 2, or --config_file examples/accelerate/fsdp2.yaml)")
    return True


def fsdp_on_cpu(acc) -> None:
    """FSDP2 over processes on the CPU (gloo), as the tests run it: accelerate (1.16) turns its FSDP plugin
    on only for accelerator devices, and makes a CPU launch with ``--use_fsdp`` plain MULTI_CPU (DDP).
    This gives that state the plugin the launch asked for, so ``prepare`` shards with ``fully_shard`` as on
    GPUs. No-op anywhere else."""
    import os

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if acc.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* environment
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    if acc.state.mixed_precision != "no":
        plugin.set_mixed_precision(acc.state.mixed_precision)


def batch_share(batch_size: int, acc) -> slice:
    """This process's rows of a global batch of ``batch_size``: consecutive, the same count on every rank."""
    n, rank = acc.num_processes, acc.process_index
    if batch_size % n:
        raise ValueError(f"batch_size: {batch_size} (the global batch) must be a multiple of the {n} processes")
    per = batch_size // n
    return slice(rank * per, (rank + 1) * per)


def prepare_plugin(acc, world: nn.Module) -> None:
    """Before ``prepare``: activation checkpointing once (when accelerate's plugin checkpoints the blocks,
    ``fsdp_activation_checkpointing``, the transformer's own, the backbone's ``gradient_checkpointing``, is
    off), and a bf16 policy that leaves the forward's inputs as they are: the window's camera poses stay
    float32 (inverted in the forward), and accelerate's autocast of the forward casts what the matmuls take."""
    import dataclasses

    plugin = acc.state.fsdp_plugin
    transformer = world.backbone.trainable()
    if plugin.activation_checkpointing and getattr(transformer, "gradient_checkpointing", False):
        transformer.disable_gradient_checkpointing()
    policy = plugin.mixed_precision_policy
    if policy is not None and getattr(policy, "cast_forward_inputs", False):
        plugin.mixed_precision_policy = dataclasses.replace(policy, cast_forward_inputs=False)


def describe(world: nn.Module, acc) -> str:
    """What ``prepare`` sharded: the root (every parameter outside a wrapped block: embeddings, modulation
    tables, controls, compressor, output, gathered by the root's forward) and the wrapped blocks by class."""
    from collections import Counter

    from torch.distributed.fsdp import FSDPModule

    units = Counter(type(m).__name__.removeprefix("FSDP") for m in world.modules() if isinstance(m, FSDPModule)
                    and m is not world)
    blocks = ", ".join(f"{n} {name}" for name, n in sorted(units.items())) or "none"
    return f"FSDP2 over {acc.num_processes} processes: the root and its wrapped blocks ({blocks})"


def full_weights(world: nn.Module, modules: dict[str, nn.Module], acc) -> dict[str, torch.Tensor] | None:
    """The weights of ``modules`` (submodules of ``world``) gathered in full on rank 0, named as
    :func:`biwm.core.checkpoint.module_state` names them; None on the other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(world)
    state = get_model_state_dict(world, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not acc.is_main_process:
        return None
    where = {id(m): name for name, m in world.named_modules()}
    out = {}
    for name, module in modules.items():
        prefix = where[id(module)] + "."
        out.update({f"{name}.{key[len(prefix):]}": value for key, value in state.items() if key.startswith(prefix)})
    return out


def _local(value: Any) -> Any:
    return value.to_local() if hasattr(value, "to_local") else value


def check_world_size(path: Path, meta: dict[str, Any], processes: int) -> None:
    """A checkpoint resumes only at the number of processes that wrote it (one: not sharded); RunError otherwise."""
    from biwm.core.runner import RunError

    saved_by = int(meta["sharded"]["world_size"]) if "sharded" in meta else 1
    if saved_by != processes or ("sharded" in meta) != (processes > 1):
        how = (f"accelerate launch --num_processes {saved_by} --use_fsdp --fsdp_version 2 -m biwm.core.cli run ..."
               if "sharded" in meta else "biwm run (one process)")
        raise RunError(f"--resume: {path} was written by {saved_by} process(es), this run has {processes}; "
                       f"resume it with {how}")


Parts = dict[str, tuple[nn.Module, "torch.optim.Optimizer | None"]]


def _training_state(world: "nn.Module | Parts", optimizer: torch.optim.Optimizer | None,
                    tensors: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """What a sharded checkpoint holds: one prepared model and its optimizer (``{"model", "optim"}``), or
    several by name (``world`` a dict name -> (model, optimizer or None: a frozen model's weights only)),
    plus named ``tensors`` (e.g. an EMA's shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    def one(module: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
        if opt is None:
            return {"model": get_model_state_dict(module)}
        model_state, optim_state = get_state_dict(module, opt)
        return {"model": model_state, "optim": optim_state}

    state = ({name: one(*pair) for name, pair in world.items()} if isinstance(world, dict)
             else one(world, optimizer))
    if tensors:
        state["tensors"] = dict(tensors)
    return state


def _model_states(state: dict[str, Any], world: "nn.Module | Parts") -> list[dict[str, Any]]:
    return [state[name]["model"] for name in world] if isinstance(world, dict) else [state["model"]]


def save_sharded_checkpoint(folder: Path, step: int, world: "nn.Module | Parts", optimizer: torch.optim.Optimizer | None,
                            extra: dict[str, Any], generator: torch.Generator, acc, keep: int = 2,
                            tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``folder/step_N`` from every rank (see the module's docstring) and keep this run's newest ``keep``.
    ``world``: one prepared model (with ``optimizer``) or several by name (``optimizer`` None; see
    :func:`_training_state`); ``tensors``: more named (sharded) tensors to keep."""
    import torch.distributed.checkpoint as dcp

    for module in ([pair[0] for pair in world.values()] if isinstance(world, dict) else [world]):
        reshard(module)
    folder = Path(folder)
    final = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = folder / f"{TEMP_MARK}{final.name}"  # a save killed midway is removed by the next run (remove_temporaries)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    state = _training_state(world, optimizer, tensors)
    bad = [k for model_state in _model_states(state, world) for k, v in model_state.items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(_local(v)).all())]
    if bad:
        raise FloatingPointError(f"not saving {final}: {len(bad)} tensors hold NaN or inf (e.g. {', '.join(bad[:3])}); "
                                 "the training diverged")
    dcp.save(state, checkpoint_id=tmp)
    save_tensors({"torch": torch.get_rng_state(), "generator": generator.get_state()},
                 tmp / f"rng_{acc.process_index}.safetensors")
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {"step": step, "run_id": current_run_id.get(), "extra": extra, "optimizers": {},
                 "sharded": {"world_size": acc.num_processes}}
        (tmp / "state.json").write_text(json.dumps({**state, "sha256": _state_digest(state)}))
        if final.exists():
            shutil.rmtree(final)
        _publish(tmp, final)
        for old in _own_checkpoints(folder)[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def load_sharded_checkpoint(path: Path, world: "nn.Module | Parts", optimizer: torch.optim.Optimizer | None,
                            generator: torch.Generator, acc,
                            tensors: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Restore a :func:`save_sharded_checkpoint` folder into the prepared ``world`` and ``optimizer`` (or
    the models and optimizers of a dict ``world``) and, in place, ``tensors`` on every rank; returns its
    state.json. Only at the number of processes that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    meta = _read_state(path)
    check_world_size(path, meta, acc.num_processes)
    state = _training_state(world, optimizer, tensors)
    dcp.load(state, checkpoint_id=path)
    pairs = world.items() if isinstance(world, dict) else [(None, (world, optimizer))]
    for name, (module, opt) in pairs:
        part = state if name is None else state[name]
        if opt is None:
            set_model_state_dict(module, part["model"])
        else:
            set_state_dict(module, opt, model_state_dict=part["model"], optim_state_dict=part["optim"])
    # ``tensors`` were loaded in place (dcp.load fills the state's own tensors)
    rng = load_tensors(path / f"rng_{acc.process_index}.safetensors", "checkpoint file")
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    return meta


WINDOW_FORWARD = "window_forward"
ATTENTION_FEATURES = "attention_features"  # a block's query/key projections of tokens (packforcing scores with them)
BLOCK_METHODS = (WINDOW_FORWARD, ATTENTION_FEATURES)  # block methods other than forward that read its weights


def register_window_forwards(world: nn.Module) -> None:
    """After ``prepare``: a sharded unit that a backbone runs through a method other than ``forward`` (its
    ``window_forward``: hunyuan's blocks, re-composed from their submodules; its ``attention_features``,
    which a compressor calls) gathers and frees its parameters around that method too (torch's
    ``register_fsdp_forward_method``)."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    for m in world.modules():
        for name in BLOCK_METHODS:
            if isinstance(m, FSDPModule) and callable(m.__dict__.get(name)):
                register_fsdp_forward_method(m, name)


def reshard(module: nn.Module) -> None:
    """Free every gathered parameter of a prepared ``module``: FSDP2 keeps the root's parameters gathered
    after a forward without a backward (e.g. a rollout under no_grad), as plain tensors in place of their
    shards; reading or writing them shard by shard needs them resharded."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class ShardedEMA:
    """An exponential moving average of a prepared (sharded) module's parameters, kept shard by shard: each
    rank averages its own shards, nothing is gathered. The same rule as the one-process EMA
    (``torch.optim.swa_utils`` with ``get_ema_multi_avg_fn``): the first update copies, then
    ``ema = decay * ema + (1 - decay) * p``."""

    def __init__(self, modules: dict[str, nn.Module], decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {f"{name}.{key}": p.detach().clone() for name, m in modules.items()
                       for key, p in m.named_parameters()}

    def _current(self, modules: dict[str, nn.Module]) -> list[torch.Tensor]:
        params = {f"{name}.{key}": p for name, m in modules.items() for key, p in m.named_parameters()}
        return [params[key].detach() for key in self.shadow]

    @torch.no_grad()
    def update_parameters(self, modules: dict[str, nn.Module]) -> None:
        """After a generator step (the name and argument of ``AveragedModel.update_parameters``)."""
        shadow, current = list(self.shadow.values()), self._current(modules)
        for s, p in zip(shadow, current):
            if self.updates == 0:
                s.copy_(p)
            else:
                s.lerp_(p, 1 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], step: int) -> None:
        """After finetune step ``step`` (0-based): :class:`biwm.core.ema.ModelEMA`'s rule, ``decay' =
        min(decay, (1 + step) / (10 + step))``, which depends on the step alone (nothing to resume)."""
        from biwm.core.ema import ema_decay

        decay = ema_decay(self.decay, step)
        # one fused lerp over the local shards: a DTensor op per parameter costs a dispatch each
        torch._foreach_lerp_([_local(s) for s in self.shadow.values()],
                             [_local(p) for p in self._current(modules)], 1 - decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, modules: dict[str, nn.Module]) -> None:
        """Write the averages into ``modules``' parameters (before gathering them for the model file)."""
        for s, p in zip(self.shadow.values(), self._current(modules)):
            p.copy_(s)
