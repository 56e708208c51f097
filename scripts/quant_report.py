"""docs/results/quant.json (and a table on stdout, for docs/results/quant.md) from scripts/quant_lab.sh's three evaluations (bf16, NVFP4 PTQ, NVFP4 QAT) and the
weight bytes of the student in bf16 and in NVFP4 (torchao's packed weight-only form: what inference stores).

    python scripts/quant_report.py RUNS_DIR docs/results/quant   # writes docs/results/quant.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ARMS = {"bf16": "bf16/metrics.json", "nvfp4_ptq": "nvfp4_ptq/metrics.json",
        "nvfp4_qat": "nvfp4_qat/evaluate/metrics.json"}
# read when present (docs/results/quant.md has their commands): the QAT recipe without quantisation (what the same
# DMD continuation does to the unquantised student), and the QAT recipe at other learning rates (the recipe's own is 3e-6)
EXTRA = {"bf16_same_dmd": "bf16_dmd60/evaluate/metrics.json",
         "nvfp4_qat_lr1e-4": "nvfp4_qat_lr1e-4/evaluate/metrics.json",
         "bf16_same_dmd_lr1e-4": "bf16_dmd60_lr1e-4/evaluate/metrics.json",
         "nvfp4_qat_lr1e-5": "nvfp4_qat_lr1e-5/evaluate/metrics.json",
         "bf16_same_dmd_lr1e-5": "bf16_dmd60_lr1e-5/evaluate/metrics.json",
         "nvfp4_qat_lr1e-5_self_distill": "nvfp4_qat_lr1e-5_sd/evaluate/metrics.json"}
# the main arms evaluated again with another noise seed (evaluate.seed=1), read when present: "evaluation_seed_1"
SEED1 = {"bf16": "seed1/bf16/metrics.json", "nvfp4_ptq": "seed1/nvfp4_ptq/metrics.json",
         "nvfp4_qat": "seed1/nvfp4_qat/metrics.json"}
# post-training NVFP4 on more of the transformer than its blocks (model.quantize.options.modules), read when present:
# what each more module costs in quality and saves in bytes
MODULE_SETS = {"nvfp4_ptq_blocks_time_proj": ("nvfp4_ptq_blocks_time_proj/metrics.json",
                                              {"modules": ["blocks.", "condition_embedder.time_proj"]}),
               "nvfp4_ptq_blocks_condition_embedder": ("nvfp4_ptq_blocks_condition_embedder/metrics.json",
                                                       {"modules": ["blocks.", "condition_embedder."]}),
               "nvfp4_ptq_all_linears": ("nvfp4_ptq_all_linears/metrics.json", {"modules": ""})}
STUDENT = Path(__file__).resolve().parents[1] / "examples" / "weights" / "toyworld-student"


def weight_bytes(options: dict | None = None) -> dict[str, int]:
    """The student's generator (transformer, controls, compressor; not the pixel codec, which has no weights
    to store) in bf16, and packed to NVFP4 as inference converts it (``apply_speedups``: the quantizer
    converts the backbone's transformer, by default the linears of its blocks; ``options`` as in
    ``model.quantize.options``)."""
    from biwm.core.loading import load_model
    from biwm.core.plugins import get_plugin_manager
    from biwm.quant import weight_bytes as stored

    world, _ = load_model(STUDENT)
    world = world.to(torch.bfloat16)
    trained = torch.nn.ModuleDict(world.trainable_modules())
    out = {"bf16": stored(trained)}
    get_plugin_manager().get("quantizer", "nvfp4").create(options or {}).convert(world.backbone.trainable(),
                                                                                training=False)
    out["nvfp4"] = stored(trained)
    return out


def arm(path: Path, nbytes: int) -> dict:
    m = json.loads(path.read_text())
    m = m.get("stages", {}).get("evaluate", m)
    return {"psnr": m["psnr_chunk1"], "psnr_mean": m["psnr"], "psnr_per_chunk": m["psnr_per_chunk"],
            "copy_last_frame_psnr_per_chunk": m["copy_last_frame_psnr_per_chunk"], "idm_accuracy": m["idm_accuracy"],
            "sharpness": m.get("sharpness"), "trajectories": m["trajectories"], "weight_bytes": nbytes,
            "chunk1_margin_db": m["psnr_chunk1"] - m["copy_last_frame_psnr_per_chunk"][0]}


def main() -> None:
    runs, out = Path(sys.argv[1]), Path(sys.argv[2])
    nbytes = weight_bytes()
    arms = {**ARMS, **{name: rel for name, rel in EXTRA.items() if (runs / rel).is_file()}}
    result = {name: arm(runs / rel, nbytes["nvfp4" if name.startswith("nvfp4") else "bf16"])
              for name, rel in arms.items()}
    for name, (rel, options) in MODULE_SETS.items():
        if (runs / rel).is_file():
            result[name] = arm(runs / rel, weight_bytes(options)["nvfp4"])
    for r in result.values():
        r["weight_bytes_ratio"] = nbytes["bf16"] / r["weight_bytes"]
    result["weight_bytes_ratio"] = nbytes["bf16"] / nbytes["nvfp4"]  # the evaluated NVFP4 arms' (the blocks')
    seed1 = {name: arm(runs / rel, nbytes["nvfp4" if name.startswith("nvfp4") else "bf16"])
             for name, rel in SEED1.items() if (runs / rel).is_file()}
    if seed1:
        result["evaluation_seed_1"] = seed1
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out.with_suffix(".json"))
    print("| arm | chunk-1 PSNR dB | over copy-last-frame dB | PSNR per chunk dB | IDM | sharpness | weight bytes |\n"
          "|---|---|---|---|---|---|---|")
    for name, r in result.items():
        if isinstance(r, dict) and "psnr" in r:
            chunks = ", ".join(f"{v:.2f}" for v in r["psnr_per_chunk"])
            print(f"| {name} | {r['psnr']:.2f} | +{r['chunk1_margin_db']:.2f} | {chunks} | {100 * r['idm_accuracy']:.1f}% | {r['sharpness']:.2f} | "
                  f"{r['weight_bytes']:,} (÷{r['weight_bytes_ratio']:.2f}) |")
    print(f"copy-last-frame per chunk: {', '.join(f'{v:.2f}' for v in result['bf16']['copy_last_frame_psnr_per_chunk'])}; "
          f"bf16 / nvfp4 weight bytes: {result['weight_bytes_ratio']:.2f}")


if __name__ == "__main__":
    main()
