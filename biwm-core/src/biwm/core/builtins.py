"""Core's built-in plugins, registered through the same hooks as external ones."""

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
