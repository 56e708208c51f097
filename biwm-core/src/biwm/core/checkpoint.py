"""Atomic safetensors checkpoints: model weights, optimizer state, RNG and step.

A checkpoint is a folder written under a temporary name and renamed, so a killed run never
leaves a half-written checkpoint that ``--resume`` could pick up.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_PREFIX = "step_"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def module_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}


def load_module_state(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], strict: bool = True,
                      source: str = "checkpoint") -> dict[str, list[str]]:
    """Load ``prefix.key`` tensors into the modules; returns {missing, unexpected, mismatched} names."""
    report: dict[str, list[str]] = {"missing": [], "unexpected": [], "mismatched": []}
    known = set()
    for name, module in modules.items():
        own = module.state_dict()
        sub = {}
        for key, value in own.items():
            full = f"{name}.{key}"
            known.add(full)
            if full not in tensors:
                report["missing"].append(full)
            elif tensors[full].shape != value.shape:
                report["mismatched"].append(f"{full} {tuple(tensors[full].shape)} vs {tuple(value.shape)}")
            else:
                sub[key] = tensors[full]
        module.load_state_dict(sub, strict=False)
    report["unexpected"] = sorted(set(tensors) - known)
    if strict and any(report.values()):
        details = "; ".join(f"{k}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}" for k, v in report.items() if v)
        raise ValueError(f"{source} does not match the model ({details})")
    return report


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    state = optimizer.state_dict()
    tensors = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, json.dumps(state["param_groups"])


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: str) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(groups)})


def save_checkpoint(folder: Path, step: int, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], extra: dict[str, Any],
                    generator: torch.Generator | None = None, keep: int = 2) -> Path:
    """Write ``folder/step_N`` atomically and keep the newest ``keep`` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in module_state(modules).items()},
                  str(tmp / "model.safetensors"))
        meta: dict[str, Any] = {"step": step, "extra": extra, "optimizers": {}}
        for name, opt in optimizers.items():
            tensors, groups = optimizer_tensors(opt)
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / f"optim_{name}.safetensors"))
            meta["optimizers"][name] = groups
        rng = {"torch": torch.get_rng_state()}
        if generator is not None:
            rng["generator"] = generator.get_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                  and (p / "state.json").is_file())


def load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    generator: torch.Generator | None = None) -> dict[str, Any]:
    """Restore weights, optimizer states and RNG from a ``step_N`` folder; returns its state.json."""
    meta = json.loads((path / "state.json").read_text())
    load_module_state(modules, load_file(str(path / "model.safetensors")), source=str(path))
    for name, opt in optimizers.items():
        load_optimizer(opt, load_file(str(path / f"optim_{name}.safetensors")), meta["optimizers"][name])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if generator is not None and "generator" in rng:
        generator.set_state(rng["generator"])
    return meta


def save_weights(path: Path, modules: dict[str, nn.Module], metadata: dict[str, str] | None = None) -> None:
    atomic_save_tensors(module_state(modules), path, metadata)
