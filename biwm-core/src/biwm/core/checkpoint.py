"""Files a run writes, and checkpoints that ``--resume`` can trust.

Every output is written under a unique temporary name beside its final name, fsynced, given the
ordinary permissions (0666 less the umask, folders 0777 less the umask) and renamed: a killed
run leaves at most a temporary (``.NAME.tmp-XXXX`` or ``.tmp-XXXX``), which the next run in the
folder removes (:func:`remove_temporaries`), never a half-written file under its real name.

Every safetensors file carries a SHA-256 of its tensors (names, dtypes, shapes and bytes) in its
metadata, so a truncated or bit-flipped file is named when it is read (:func:`load_tensors`)
instead of loading silently or failing with an anonymous error. Weights are checked to be finite
before they are saved: a diverged training ends in an error, not in a model of NaNs.

A checkpoint is a folder ``step_N`` written the same way, holding the weights, optimizer states,
RNG, and ``state.json`` (its step, the run id of the run that wrote it, a checksum of itself).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

CHECKPOINT_PREFIX = "step_"
DIGEST_KEY = "biwm_sha256"
TEMP_MARK = ".tmp-"

# The id of the run being executed (set by the runner): checkpoints record it, and a run resumes
# only from its own checkpoints. None (a direct call, a benchmark): no filtering.
current_run_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("biwm_run_id", default=None)


class CorruptFileError(ValueError):
    """A file that cannot be read back as it was written; the message names it and says why."""


def _mode(directory: bool) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` (a file, or a folder and its files), give it the ordinary permissions, rename it
    to ``final`` and fsync the parent, so the rename is durable and never exposes partial content."""
    if tmp.is_dir():
        for child in tmp.rglob("*"):
            if child.is_file():
                child.chmod(_mode(False))
                _fsync(child)
        tmp.chmod(_mode(True))
    else:
        tmp.chmod(_mode(False))  # mkstemp creates files private (0600)
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(final.parent)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A unique temporary file name beside ``path`` (same suffix, so writers that go by the
    extension work) to write to; published as ``path`` when the block ends, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A unique temporary folder beside ``path`` to fill; replaces ``path`` when the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=TEMP_MARK))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(folder: Path) -> list[Path]:
    """Remove what killed writes left under ``folder`` (only names this module makes); returns them.
    Call it only while no other process writes there (the runner holds the run folder's lock)."""
    found = sorted(p for p in Path(folder).rglob(f"*{TEMP_MARK}*")
                   if p.name.startswith(".") and TEMP_MARK in p.name)
    removed = []
    for p in found:
        if not p.exists() and not p.is_symlink():
            continue  # inside a temporary folder removed just before
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse to save non-finite weights: a diverged run must fail, not write a model of NaNs."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"not saving {path}: {len(bad)} of {len(tensors)} tensors hold NaN or inf "
                                 f"(e.g. {', '.join(bad[:3])}); the training diverged")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (with its checksum) to exactly ``path``; see :func:`atomic_save_tensors`."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(cpu, str(path), metadata={**(metadata or {}), DIGEST_KEY: tensor_digest(cpu)})


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_tensors(tensors, tmp, metadata)


def read_metadata(path: Path, what: str = "safetensors file") -> dict[str, str]:
    """The metadata of a safetensors file (its header only); names the file if it is not one."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptFileError(f"{path}: not a readable {what} ({exc})") from None


def load_tensors(path: Path, what: str = "safetensors file") -> dict[str, torch.Tensor]:
    """Every tensor of ``path``, checked against the checksum it was saved with (files written
    before checksums existed load unchecked). Raises :class:`CorruptFileError` naming the file."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptFileError(f"{path}: not a readable {what} ({exc})") from None
    if DIGEST_KEY in meta and tensor_digest(tensors) != meta[DIGEST_KEY]:
        raise CorruptFileError(f"{path}: {what} is corrupt (its tensors do not match the checksum saved with them)")
    return tensors


INT8_SCALE = ".__int8_scale__"  # the per-row scale of an int8-stored weight, saved under its name + this
STORAGE_KEY = "biwm_storage"


def quantize_int8(tensors: dict[str, torch.Tensor], min_row: int = 16) -> dict[str, torch.Tensor]:
    """Weight-only int8 storage for shipping a model file at half its bfloat16 size: every floating
    tensor with at least two rows of ``min_row`` values or more becomes int8 with one float32 scale
    per row (its largest magnitude / 127; rounding error at most half a step), the rest (biases,
    norms, modulation tables) stays as it is. :func:`dequantize_int8` reverses it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(INT8_SCALE):
            raise ValueError(f"{key}: tensor names ending in {INT8_SCALE!r} are reserved for int8 storage")
        if value.is_floating_point() and value.dim() >= 2 and value.shape[0] > 1 and value[0].numel() >= min_row:
            rows = value.detach().float().reshape(value.shape[0], -1)
            scale = rows.abs().amax(1).clamp_min(1e-12) / 127
            out[key] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(value.shape)
            out[key + INT8_SCALE] = scale
        else:
            out[key] = value
    return out


def dequantize_int8(tensors: dict[str, torch.Tensor], source: str = "model file") -> dict[str, torch.Tensor]:
    """Float32 weights back from :func:`quantize_int8` storage (a file without int8 tensors passes
    through unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(INT8_SCALE):
            if key[: -len(INT8_SCALE)] not in tensors:
                raise CorruptFileError(f"{source}: {key} is the scale of a tensor the file does not hold")
            continue
        scale = tensors.get(key + INT8_SCALE)
        if scale is None:
            out[key] = value
        elif value.dtype != torch.int8 or scale.shape != (value.shape[0],):
            raise CorruptFileError(f"{source}: {key} has an int8 scale but is {value.dtype} {tuple(value.shape)} "
                                   f"with a scale of shape {tuple(scale.shape)}")
        else:
            out[key] = (value.float().reshape(value.shape[0], -1) * scale.float()[:, None]).reshape(value.shape)
    return out


def load_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A model file's weights as floats: :func:`load_tensors`, then int8-stored matrices dequantised."""
    return dequantize_int8(load_tensors(path, "model file"), str(path))


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


def _state_digest(state: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def save_checkpoint(folder: Path, step: int, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], extra: dict[str, Any],
                    generator: torch.Generator | None = None, keep: int = 2) -> Path:
    """Write ``folder/step_N`` atomically and keep this run's newest ``keep`` checkpoints."""
    final = Path(folder) / f"{CHECKPOINT_PREFIX}{step:08d}"
    weights = module_state(modules)
    check_finite(weights, final / "model.safetensors")
    with atomic_folder(final) as tmp:
        save_tensors(weights, tmp / "model.safetensors")
        state: dict[str, Any] = {"step": step, "run_id": current_run_id.get(), "extra": extra, "optimizers": {}}
        for name, opt in optimizers.items():
            tensors, groups = optimizer_tensors(opt)
            save_tensors(tensors, tmp / f"optim_{name}.safetensors")
            state["optimizers"][name] = groups
        rng = {"torch": torch.get_rng_state()}
        if generator is not None:
            rng["generator"] = generator.get_state()
        save_tensors(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "sha256": _state_digest(state)}))
    for old in _own_checkpoints(Path(folder))[:-keep]:
        shutil.rmtree(old)
    return final


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file holding an object; CorruptFileError (a ValueError) naming the file otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: not {what}")
    return data


def _read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked against its own checksum."""
    state = read_json_object(path / "state.json", "a checkpoint state")
    digest = state.pop("sha256", None)
    if digest is not None and digest != _state_digest(state):
        raise CorruptFileError(f"{path / 'state.json'}: corrupt (does not match its checksum)")
    return state


def _own_checkpoints(folder: Path) -> list[Path]:
    """This run's complete checkpoint folders, oldest first (by step), unverified."""
    if not folder.is_dir():
        return []
    run_id = current_run_id.get()
    own = []
    for p in sorted(folder.iterdir()):
        if not (p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file()):
            continue
        if run_id is not None:
            try:
                owner = _read_state(p).get("run_id")
            except CorruptFileError:
                owner = run_id  # its own damage is reported by list_checkpoints
            if owner != run_id:
                continue
        own.append(p)
    return own


def verify_checkpoint(path: Path) -> None:
    """Read every file of a checkpoint and check it against its checksum; raises CorruptFileError. A
    sharded checkpoint (:mod:`biwm.core.sharded`) is checked for its index and its ranks' RNG files."""
    state = _read_state(path)
    if "sharded" in state:
        if not (path / ".metadata").is_file():
            raise CorruptFileError(f"{path}: sharded checkpoint without its index (.metadata)")
        for rank in range(int(state["sharded"]["world_size"])):
            load_tensors(path / f"rng_{rank}.safetensors", "checkpoint file")
        return
    for name in ["model", *(f"optim_{o}" for o in state.get("optimizers", {})), "rng"]:
        load_tensors(path / f"{name}.safetensors", "checkpoint file")


def list_checkpoints(folder: Path) -> list[Path]:
    """The current run's checkpoints in ``folder``, oldest first, ending with the newest intact one:
    newer ones that fail :func:`verify_checkpoint` are left out with a warning, and so (with a
    warning) are checkpoints another run wrote into the folder."""
    folder = Path(folder)
    own = _own_checkpoints(folder)
    if folder.is_dir():
        foreign = sorted({p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)} - set(own))
        if foreign:
            warnings.warn(f"{folder}: ignoring {len(foreign)} checkpoint(s) this run did not write "
                          f"({', '.join(p.name for p in foreign[:3])})", stacklevel=2)
    while own:
        try:
            verify_checkpoint(own[-1])
            return own
        except CorruptFileError as exc:
            bad = own.pop()
            warnings.warn(f"checkpoint {bad} is damaged and skipped: {exc}; "
                          + (f"falling back to {own[-1].name}" if own else "no older checkpoint is left"),
                          stacklevel=2)
    return own


def load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    generator: torch.Generator | None = None) -> dict[str, Any]:
    """Restore weights, optimizer states and RNG from a ``step_N`` folder; returns its state.json."""
    meta = _read_state(path)
    if "sharded" in meta:  # written by several processes (biwm.core.sharded)
        from biwm.core.sharded import check_world_size

        check_world_size(path, meta, 1)
    load_module_state(modules, load_tensors(path / "model.safetensors", "checkpoint file"), source=str(path))
    for name, opt in optimizers.items():
        load_optimizer(opt, load_tensors(path / f"optim_{name}.safetensors", "checkpoint file"),
                       meta["optimizers"][name])
    rng = load_tensors(path / "rng.safetensors", "checkpoint file")
    torch.set_rng_state(rng["torch"])
    if generator is not None and "generator" in rng:
        generator.set_state(rng["generator"])
    return meta


def save_weights(path: Path, modules: dict[str, nn.Module], metadata: dict[str, str] | None = None,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
    """A stage's model file: the modules' weights (or ``weights``, already named as
    :func:`module_state` names them); refuses non-finite weights (FloatingPointError naming the file)."""
    weights = module_state(modules) if weights is None else weights
    check_finite(weights, path)
    atomic_save_tensors(weights, path, metadata)
