"""One recipe across backbone families: run a recipe once per backbone, changing only its
``model.backbone`` block, and put each run's scores side by side (PREFIX.json and PREFIX.md).

    python scripts/compare_backbones.py --out docs/results/backbones
    python scripts/compare_backbones.py --backbone 'hunyuan={name: hunyuan, options: {preset: tiny}}' \\
        --set finetune.steps=2 --runs /tmp/backbones

Default: examples/backbones.yaml (the toy lab's finetune, distill and evaluate at tiny size, a few steps)
with Wan, HunyuanVideo-1.5 and LTX-2.3 at their tiny presets, 2 blocks each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = {"wan": "{name: wan, options: {preset: tiny, overrides: {num_layers: 2}}}",
             "hunyuan": "{name: hunyuan, options: {preset: tiny, overrides: {num_layers: 2}}}",
             "ltx": "{name: ltx, options: {preset: tiny, overrides: {num_layers: 2}}}"}
# What the table shows of each run: (stage, metric, label)
ROWS = [("finetune", "finetune_loss_first", "stage 1: training loss, first step"),
        ("finetune", "finetune_loss_last", "stage 1: training loss, last step"),
        ("distill", "distill_generator_loss_last", "stage 2: generator loss, last update"),
        ("evaluate", "teacher_psnr", "stage 1 model (teacher): PSNR vs truth, dB"),
        ("evaluate", "teacher_idm_accuracy", "stage 1 model (teacher): camera following (IDM accuracy)"),
        ("evaluate", "psnr", "stage 2 student: PSNR vs truth, dB"),
        ("evaluate", "ssim", "stage 2 student: SSIM"),
        ("evaluate", "idm_accuracy", "stage 2 student: camera following (IDM accuracy)"),
        ("evaluate", "copy_last_frame_psnr", "copy-last-frame baseline: PSNR, dB"),
        ("evaluate", "idm_chance", "IDM chance level"),
        ("evaluate", "nfe_per_chunk", "student network evaluations per chunk"),
        ("run", "transformer_params_m", "transformer parameters, M"),
        ("run", "seconds", "wall time of the three stages, s")]


def run_one(recipe: Path, backbone: str, run_dir: Path, sets: list[str]) -> dict:
    """Run ``recipe`` with ``model.backbone`` = ``backbone`` (YAML) in ``run_dir``; its scores by stage."""
    from biwm.core.recipe import apply_overrides, load_recipe_data, validate_recipe
    from biwm.core.runner import RunContext, run_recipe

    data = apply_overrides(load_recipe_data(recipe), [*sets, f"model.backbone={backbone}", f"run_dir={run_dir}"],
                           source=str(recipe))
    parsed = validate_recipe(data, base_dir=recipe.parent, source=str(recipe))
    params = sum(p.numel() for p in RunContext(recipe=parsed, run_dir=run_dir).build_world_model()
                 .backbone.trainable().parameters())
    start = time.perf_counter()
    metrics = run_recipe(parsed)["stages"]
    metrics["run"] = {"seconds": time.perf_counter() - start, "transformer_params_m": params / 1e6,
                      "backbone": backbone}
    return metrics


def cell(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(runs: dict[str, dict]) -> str:
    names = list(runs)
    lines = ["| | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    for stage, key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(runs[n].get(stage, {}).get(key)) for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "examples" / "backbones.yaml")
    parser.add_argument("--backbone", action="append", metavar="NAME=YAML",
                        help="a model.backbone block to run (repeatable; default: wan, hunyuan and ltx, tiny)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every run (as biwm run --set)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "backbones",
                        help="folder of the runs, one per backbone")
    parser.add_argument("--out", type=Path, help="write PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)
    backbones = BACKBONES if not args.backbone else dict(b.split("=", 1) for b in args.backbone)
    runs = {name: run_one(args.recipe, block, args.runs / name, args.set) for name, block in backbones.items()}
    print(table(runs))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python scripts/compare_backbones.py " + " ".join(sys.argv[1:] if argv is None else argv)
        args.out.with_suffix(".json").write_text(json.dumps({"command": command, "recipe": str(args.recipe),
                                                             "sets": args.set, "runs": runs}, indent=2, default=str)
                                                 + "\n")
        args.out.with_suffix(".md").write_text(f"`{command}`\n\n{table(runs)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
