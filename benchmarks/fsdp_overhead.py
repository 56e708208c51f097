"""What FSDP2 costs in one process: the same recipe's finetune stage run plainly (``biwm run``) and under
``accelerate launch`` with FSDP2 and one process (the shipped ``examples/accelerate/fsdp2.yaml``), arms
alternating, steps per second read from each run's ``metrics.json`` (the stage's own timing of its loop).

    python benchmarks/fsdp_overhead.py --out docs/results/fsdp_overhead_h200          # one GPU
    python benchmarks/fsdp_overhead.py --steps 3 --clips 8 --repeats 1 --preset tiny --out /tmp/fsdp  # CPU smoke run

The recipe is ``--recipe`` (default: the toy lab's, ``examples/toy_lab.yaml``) with only its run length
changed: ``finetune.steps``, ``data.train_clips`` and a one-trajectory ``evaluate``. Mixed precision is
the recipe's own (``--mixed-precision no``: accelerate adds no autocast; the toy lab trains in float32).
The table gives each arm's median steps per second over ``--repeats`` runs and the FSDP2 arm's step time
over the plain arm's, both from this run (issue 19 asks for at most 1.05).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, median, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def command(arm: str, recipe: Path, run_dir: Path, args) -> list[str]:
    sets = [f"run_dir={run_dir}", f"finetune.steps={args.steps}", f"data.train_clips={args.clips}",
            "finetune.checkpoint_every=1000000", "evaluate.trajectories=1", "evaluate.chunks=1"]
    if args.preset:
        sets.append(f"model.backbone.options.preset={args.preset}")
    run = ["-m", "biwm.core.cli", "run", str(recipe), "--force", *[a for s in sets for a in ("--set", s)]]
    if arm == "plain":
        return [sys.executable, *run]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "examples" / "accelerate" / "fsdp2.yaml"), "--num_processes", "1",
            "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no", *run]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "examples" / "toy_lab.yaml")
    parser.add_argument("--steps", type=int, default=600, help="finetune steps per run")
    parser.add_argument("--clips", type=int, default=256, help="training clips (data.train_clips)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating")
    parser.add_argument("--preset", default="", help="override model.backbone.options.preset (e.g. tiny)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes OUT.json and OUT.md")
    args = parser.parse_args()
    if not args.recipe.is_file():
        raise SystemExit(f"error: --recipe {args.recipe}: no such file")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs: list[dict] = []
    header = {"recipe": str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe),
              "steps": args.steps, "clips": args.clips, "preset_override": args.preset or None,
              "mixed_precision": args.mixed_precision, "environment": environment(device)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="biwm-fsdp-bench-") as tmp:
        for i in range(args.repeats):
            for arm in ("plain", "fsdp2"):
                run_dir = Path(tmp) / f"{arm}-{i}"
                started = time.perf_counter()
                out = subprocess.run(command(arm, args.recipe, run_dir, args), capture_output=True, text=True,
                                     env={**os.environ, "COLUMNS": "200"})
                if out.returncode != 0:
                    raise SystemExit(f"error: the {arm} run failed (exit {out.returncode}):\n"
                                     f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
                metrics = json.loads((run_dir / "finetune" / "metrics.json").read_text())
                sharded = "FSDP2 over" in out.stdout
                if device.type == "cuda" and (arm == "fsdp2") != sharded:  # accelerate shards no CPU process
                    raise SystemExit(f"error: the {arm} run {'did not shard' if arm == 'fsdp2' else 'sharded'}:\n"
                                     f"{out.stdout[-2000:]}")
                runs.append({"arm": arm, "repeat": i, "steps_per_second": metrics["finetune_steps_per_second"],
                             "steps": metrics["finetune_steps"], "sharded": sharded, "wall_seconds": round(time.perf_counter() - started, 1)})
                write_json(args.out.with_suffix(".json"), {**header, "runs": runs})  # a cut-off run keeps its rows
                print(f"{arm} #{i}: {metrics['finetune_steps_per_second']} steps/s "
                      f"({runs[-1]['wall_seconds']} s with start-up)", flush=True)
    per_arm = {arm: median([r["steps_per_second"] for r in runs if r["arm"] == arm]) for arm in ("plain", "fsdp2")}
    ratio = per_arm["plain"] / per_arm["fsdp2"]
    rows = [[arm, f"{per_arm[arm]:.2f}", f"{1e3 / per_arm[arm]:.1f}",
             " ".join(f"{r['steps_per_second']:.2f}" for r in runs if r["arm"] == arm)] for arm in per_arm]
    table = markdown_table(["arm", "steps/s (median)", "ms per step", "each run"], rows)
    print(table)
    print(f"FSDP2 (1 process) step time / plain: {ratio:.3f}")
    write_json(args.out.with_suffix(".json"), {**header, "runs": runs, "median_steps_per_second": per_arm,
                                               "fsdp2_step_time_over_plain": ratio})
    args.out.with_suffix(".md").write_text(f"# FSDP2 in one process against plain\n\n{table}\n\n"
                                           f"FSDP2 step time / plain: {ratio:.3f}\n")


if __name__ == "__main__":
    main()
