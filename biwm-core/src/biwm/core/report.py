"""Human-readable evaluation output: report.md with PNG plots for one run, and side-by-side
comparisons of several runs (``biwm compare``). Every file is written to a temporary name first.
Rows are picked by metric name and left out when a run lacks them: the camera-following and
dynamics rows are what a dataset's own scores add (the toy world's, biwm-toyworld)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from torch import Tensor

from biwm.core.camera import ROTATIONS, TRANSLATIONS
from biwm.core.checkpoint import atomic_path, atomic_write_text

# (key, label, format) rows of the report's tables; rows whose key is missing are left out.
CAMERA_ROWS = [
    ("idm_accuracy", "IDM accuracy of the rollout (all 81 labels)", ".3f"),
    ("idm_translation_accuracy", "… translation only", ".3f"),
    ("idm_rotation_accuracy", "… rotation only", ".3f"),
    ("idm_accuracy_shuffled", "IDM accuracy, rollout given another trajectory's actions", ".3f"),
    ("idm_accuracy_true_clips", "IDM accuracy on the true clips (the judge's own accuracy)", ".3f"),
    ("idm_chance", "chance (agreement of unrelated action sequences)", ".3f"),
    ("rotation_error_deg", "rotation error of IDM-integrated poses (deg, mean over frames)", ".2f"),
    ("translation_error", "camera-centre error of IDM-integrated poses (world units)", ".3f"),
]
QUALITY_ROWS = [
    ("psnr", "PSNR vs the true continuation (dB)", ".2f"),
    ("ssim", "SSIM vs the true continuation", ".3f"),
    ("psnr_chunk1", "PSNR, first chunk (dB)", ".2f"),
    ("psnr_last", "PSNR, last chunk (dB)", ".2f"),
    ("psnr_drop", "PSNR drop first → last chunk (dB)", ".2f"),
    ("psnr_shuffled_actions", "PSNR with another trajectory's actions (dB)", ".2f"),
    ("copy_last_frame_psnr", "PSNR of repeating the last true frame (dB)", ".2f"),
]
DYNAMICS_ROWS = [
    ("dynamics", "dynamics: (generated − generated with boxes frozen) / true changed-pixel fraction", ".2f"),
    ("dynamics_generated", "changed-pixel fraction, generated", ".4f"),
    ("dynamics_generated_frozen", "changed-pixel fraction, generated, boxes frozen (flicker floor)", ".4f"),
    ("dynamics_true", "changed-pixel fraction, true", ".4f"),
    ("diversity", "diversity: mean |difference| between samples (0-1 pixels)", ".4f"),
]


# (what, format) of the distilled generator beside its teacher: student_<what> and teacher_<what>.
TEACHER_ROWS = [
    ("psnr", "PSNR vs the true continuation (dB)", ".2f"),
    ("ssim", "SSIM vs the true continuation", ".3f"),
    ("sharpness", "sharpness (high-frequency energy ratio)", ".3f"),
    ("idm_accuracy", "IDM accuracy of the rollout", ".3f"),
    ("nfe_per_chunk", "network evaluations per chunk", "d"),
]


def _teacher_table(metrics: dict[str, Any]) -> list[str]:
    """The distilled generator against its teacher on the same trajectories (from evaluate's
    ``compare_teacher``); empty when the metrics hold no teacher."""
    if metrics.get("teacher_psnr") is None:
        return []
    lines = ["## Distilled generator vs its teacher", "",
             f"Same trajectories; student: {metrics.get('sampler', '–')}; teacher: "
             f"{metrics.get('teacher_sampler', '–')}.", "",
             "| metric | student | teacher |", "| --- | --- | --- |"]
    for what, label, fmt in TEACHER_ROWS:
        student, teacher = metrics.get(f"student_{what}"), metrics.get(f"teacher_{what}")
        if student is not None or teacher is not None:
            lines.append(f"| {label} (`student_{what}`, `teacher_{what}`) | {_fmt(student, fmt)} | "
                         f"{_fmt(teacher, fmt)} |")
    return lines + [""]


def _key(metrics: dict[str, Any], key: str) -> str:
    """Resolve the aliases ``psnr_last`` / ``psnr_drop`` to the run's chunk count."""
    chunks = metrics.get("chunks")
    return {"psnr_last": f"psnr_chunk{chunks}", "psnr_drop": f"psnr_drop_1_to_{chunks}"}.get(key, key)


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, fmt) if isinstance(value, (int, float)) else str(value)


def _table(metrics: dict[str, Any], rows: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| metric | value |", "| --- | --- |"]
    for key, label, fmt in rows:
        name = _key(metrics, key)
        if metrics.get(name) is not None:
            lines.append(f"| {label} (`{name}`) | {_fmt(metrics[name], fmt)} |")
    return lines


def _save_figure(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_drift(runs: dict[str, dict[str, Any]], path: Path, baseline: bool = True) -> None:
    """PSNR and SSIM per chunk, one line per run (and the copy-last-frame baseline of the first; for
    one distilled run, its teacher)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for ax, metric, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
        for name, m in runs.items():
            values = m.get(f"{metric}_per_chunk")
            if values:
                ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=name)
        first = next(iter(runs.values()))
        if len(runs) == 1 and first.get(f"teacher_{metric}_per_chunk"):
            values = first[f"teacher_{metric}_per_chunk"]
            ax.plot(range(1, len(values) + 1), values, marker="s", ms=3, ls=":", label="teacher")
        if baseline and first.get(f"copy_last_frame_{metric}_per_chunk"):
            values = first[f"copy_last_frame_{metric}_per_chunk"]
            ax.plot(range(1, len(values) + 1), values, ls="--", color="grey", label="repeat last true frame")
        ax.set_xlabel("chunk")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # chunks are whole numbers
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Quality against the true continuation, per chunk (drift)")
    _save_figure(fig, path)
    plt.close(fig)


def plot_idm_per_action(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """IDM accuracy per commanded translation and rotation: each run's rollout, and the true clips."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
    first = next(iter(runs.values()))
    for ax, factor, names in ((axes[0], "translation", TRANSLATIONS), (axes[1], "rotation", ROTATIONS)):
        bars = [(f"{name} rollout", m.get(f"idm_per_{factor}", {})) for name, m in runs.items()]
        bars.append(("true clips", first.get(f"idm_per_{factor}_true_clips", {})))
        width = 0.8 / len(bars)
        for i, (label, values) in enumerate(bars):
            heights = [values.get(n) if values.get(n) is not None else float("nan") for n in names]
            ax.bar([x + (i - (len(bars) - 1) / 2) * width for x in range(len(names))], heights, width, label=label)
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"IDM {factor} accuracy")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Camera following per commanded action")
    _save_figure(fig, path)
    plt.close(fig)


def write_report(folder: Path, metrics: dict[str, Any], title: str, strip: list[Tensor] | None = None,
                 strip_every: int = 1) -> None:
    """report.md + drift.png (+ idm_per_action.png when the dataset judged camera following, as the
    toy world does; + samples.png: truth over generated). Sections whose metrics are absent are left out."""
    from biwm.core.video import write_strip

    folder = Path(folder)
    camera = any(metrics.get(key) is not None for key, _, _ in CAMERA_ROWS)
    plot_drift({"model": metrics}, folder / "drift.png")
    if camera:
        plot_idm_per_action({"model": metrics}, folder / "idm_per_action.png")
    if strip:
        write_strip(folder / "samples.png", strip, every=strip_every, scale=max(1, 96 // strip[0].shape[-1]),
                    labels=["truth", "generated"] if len(strip) == 2 else None)
    lines = [f"# {title}", "",
             f"{metrics.get('trajectories')} held-out trajectories, {metrics.get('history_latent_frames')} true "
             f"history latent frames, then {metrics.get('chunks')} chunks of {metrics.get('chunk_latent_frames')} latent "
             f"frames; {metrics.get('steps')} denoising steps per chunk, CFG {metrics.get('cfg_scale')}, attention "
             f"`{metrics.get('attention')}`. Raw numbers: `metrics.json`.", ""]
    if camera:
        lines += ["## Camera following", "", *_table(metrics, CAMERA_ROWS), "",
                  "![IDM accuracy per action](idm_per_action.png)", ""]
    lines += ["## Quality over time", "", *_table(metrics, QUALITY_ROWS), "", "![drift](drift.png)", "",
              *_teacher_table(metrics)]
    if metrics.get("dynamics_true") is not None:
        lines += ["## Dynamics and diversity (still camera)", "", *_table(metrics, DYNAMICS_ROWS), ""]
    if strip:
        lines += ["## Samples", "", f"First trajectory, one frame in {strip_every}: truth (top), generated "
                  "(bottom); the first frames are the shared true history.", "", "![samples](samples.png)", ""]
    atomic_write_text(folder / "report.md", "\n".join(lines))


# Keys every comparison reports per run, when present.
COMPARE_KEYS = ["idm_accuracy", "idm_accuracy_last5", "idm_translation_accuracy", "idm_rotation_accuracy",
                "idm_accuracy_shuffled", "psnr", "ssim", "psnr_chunk1", "psnr_last", "psnr_drop", "ssim_chunk1",
                "sharpness", "dynamics", "diversity", "dynamics_generated", "dynamics_generated_frozen",
                "rotation_error_deg", "translation_error", "nfe_per_chunk", "chunk1_margin_db"]


def chunk1_margin_db(metrics: dict[str, Any]) -> float | None:
    """Chunk-1 PSNR over copy-last-frame's (dB): above 2, the model is a working world model, not noise."""
    psnr, copy = metrics.get("psnr_per_chunk"), metrics.get("copy_last_frame_psnr_per_chunk")
    return psnr[0] - copy[0] if psnr and copy else None


def _mean(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else sum(values) / len(values)


def merge_seeds(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's evaluations (one per training seed) as one metrics dict: each number and per-chunk curve
    averaged over the seeds, ``seeds`` their count, and for several seeds ``KEY_spread`` (half the range
    over the seeds, the ``±`` of the tables) and ``per_seed`` (each seed's value). The rest (per-action
    accuracies, the true clips' scores) is the first seed's."""
    if not seeds:
        raise ValueError("merge_seeds: no evaluations given")
    seeds = [{"chunk1_margin_db": chunk1_margin_db(m), **m} for m in seeds]
    merged = dict(seeds[0])
    per_seed: dict[str, list[Any]] = {}
    for key in {_key(m, k) for m in seeds for k in COMPARE_KEYS}:
        values = [m.get(key) for m in seeds]
        if any(v is None or isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            continue
        merged[key] = _mean(values)
        if len(seeds) > 1:
            per_seed[key] = values
            merged[f"{key}_spread"] = (max(values) - min(values)) / 2
    for key in ("psnr_per_chunk", "ssim_per_chunk", "idm_accuracy_per_chunk"):
        curves = [m.get(key) for m in seeds]
        if all(curves) and len({len(c) for c in curves}) == 1:
            merged[key] = [_mean(list(values)) for values in zip(*curves)]
    merged["seeds"] = len(seeds)
    if len(seeds) > 1:
        merged["per_seed"] = per_seed
    return merged


def _cell(entry: dict[str, Any], key: str) -> str:
    text = _fmt(entry.get(key), ".3f")
    spread = entry.get(f"{key}_spread")
    return text if spread is None else f"{text} ± {spread:.3f}"


def compare_runs(runs: dict[str, dict[str, Any] | list[dict[str, Any]]], out: Path, title: str, notes: str = "",
                 setup: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write OUT.json (the headline numbers per run), OUT.md (a table, the plots and ``notes``),
    OUT_drift.png and OUT_idm.png. A run given as a list of evaluations (one per seed) is reported as
    their mean, with ``KEY_spread`` (half the range), ``per_seed`` and ``seeds`` (``merge_seeds``).
    Returns the JSON document."""
    out = Path(out)
    runs = {name: merge_seeds(m if isinstance(m, list) else [m]) for name, m in runs.items()}
    doc: dict[str, Any] = {}
    for name, m in runs.items():
        keys = [_key(m, key) for key in COMPARE_KEYS if m.get(_key(m, key)) is not None]
        entry = {key: m[key] for key in keys}
        entry.update({f"{key}_spread": m[f"{key}_spread"] for key in keys if f"{key}_spread" in m})
        entry["seeds"] = m["seeds"]
        if "per_seed" in m:
            entry["per_seed"] = m["per_seed"]
        entry["psnr_per_chunk"] = m.get("psnr_per_chunk")
        doc[name] = entry
    first = next(iter(runs.values()))
    for key in ("idm_accuracy_true_clips", "idm_chance", "copy_last_frame_psnr_per_chunk"):
        if key in first:
            doc[key] = first[key]
    if setup:
        doc["setup"] = setup
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=2, default=str))  # YAML dates
    plot_drift(runs, out.with_name(out.name + "_drift.png"))
    plot_idm_per_action(runs, out.with_name(out.name + "_idm.png"))
    keys = [k for k in doc[next(iter(runs))] if k not in ("psnr_per_chunk", "per_seed") and not k.endswith("_spread")]
    lines = [f"# {title}", "", "| metric | " + " | ".join(runs) + " |", "| --- |" + " --- |" * len(runs)]
    for key in keys:
        lines.append(f"| `{key}` | " + " | ".join(_cell(doc[n], key) for n in runs) + " |")
    for key in ("idm_accuracy_true_clips", "idm_chance"):
        if key in doc:
            lines.append(f"| `{key}` (same held-out clips for all) | " + " | ".join(
                [_fmt(doc[key], ".3f")] * len(runs)) + " |")
    if any(doc[n]["seeds"] > 1 for n in runs):
        lines += ["", "Several seeds: mean ± half the range over the seeds (`per_seed` in the JSON)."]
    lines += ["", f"![drift]({out.name}_drift.png)", "", f"![IDM per action]({out.name}_idm.png)", ""]
    if notes:
        lines += [notes.strip(), ""]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    return doc
