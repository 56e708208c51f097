"""Collect the toy lab's two evaluations into docs/results/toy_lab.json (the figures of issue 13).

    python scripts/toy_lab_report.py TEACHER_EVAL/metrics.json STUDENT_EVAL/metrics.json [--out docs/results/toy_lab.json]

Each side keeps: trajectories, psnr_per_chunk, copy_last_frame_psnr_per_chunk, idm_accuracy,
idm_accuracy_last5 (chunks 16-20 of 20), dynamics, sharpness, nfe_per_chunk (and the sampler).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = ["trajectories", "psnr_per_chunk", "copy_last_frame_psnr_per_chunk", "idm_accuracy", "idm_accuracy_last5",
        "dynamics", "sharpness", "nfe_per_chunk", "sampler", "idm_accuracy_true_clips", "idm_chance"]


def side(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    metrics = metrics.get("stages", {}).get("evaluate", metrics)
    missing = [k for k in KEYS if k not in metrics]
    if missing:
        sys.exit(f"{path}: not an evaluation with every toy-lab figure (missing {', '.join(missing)})")
    return {k: metrics[k] for k in KEYS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", type=Path)
    ap.add_argument("student", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/results/toy_lab.json"))
    args = ap.parse_args()
    doc = {"teacher": side(args.teacher), "student": side(args.student)}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
