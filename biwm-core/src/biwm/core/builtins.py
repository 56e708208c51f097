"""Core's built-in plugins, registered through the same hooks as external ones. Core has no
dataset of its own: the toy world is biwm-toyworld's plugin."""

from biwm.core.hookspecs import hookimpl


@hookimpl
def register_controls(register):
    from biwm.core.controls import ActionControl, ActionOptions, PluckerControl, PluckerOptions

    register("plucker", PluckerControl, options=PluckerOptions,
             description="camera poses as Plücker rays, patchified, zero-initialised projection")
    register("actions", ActionControl, options=ActionOptions,
             description="the 81 discrete actions (9 translations x 9 rotations), zero-initialised")


@hookimpl
def register_compressors(register):
    from biwm.core.compressors import LastFrames, LastFramesOptions

    register("none", LastFrames, options=LastFramesOptions,
             description="no compression: the last N history frames at full resolution")


@hookimpl
def register_losses(register):
    from biwm.core.dmd import DMD, DMDOptions

    register("dmd", DMD, options=DMDOptions,
             description="distribution matching: teacher (with CFG) minus critic score on self-rollouts")


@hookimpl
def register_stages(register):
    # Config models only: each runner is a "module:function" string, imported when its stage runs.
    from biwm.core.stages.distill import DistillConfig
    from biwm.core.stages.evaluate import EvaluateConfig
    from biwm.core.stages.export import ExportConfig
    from biwm.core.stages.finetune import FinetuneConfig
    from biwm.core.stages.generate import GenerateConfig

    register("finetune", FinetuneConfig, "biwm.core.stages.finetune:run",
             description="teach the backbone the next chunk given history and camera/action control")
    register("distill", DistillConfig, "biwm.core.stages.distill:run",
             description="distil a few-step student on its own rollouts (losses: dmd and plugins)")
    register("generate", GenerateConfig, "biwm.core.stages.generate:run",
             description="roll the model out on held-out clips: videos, strips, chunk PSNR")
    register("evaluate", EvaluateConfig, "biwm.core.stages.evaluate:run",
             description="score quality and drift on held-out clips, and the dataset's own scores (the toy "
                         "world's: camera following, dynamics); report.md and plots")
    register("export", ExportConfig, "biwm.core.stages.export:run",
             description="write the diffusers transformer folder, the BiWM parts and the model card")
