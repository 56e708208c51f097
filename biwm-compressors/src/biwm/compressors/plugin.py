"""Entry point of biwm-compressors: the ``framepack`` and ``packforcing`` history compressors."""

from biwm.core import hookimpl


@hookimpl
def register_compressors(register):
    from biwm.compressors.framepack import FramePack, FramePackOptions
    from biwm.compressors.packforcing import PackForcing, PackForcingOptions

    register("framepack", FramePack, options=FramePackOptions,
             description="nearer history frames keep more tokens: coarser patch embeddings per level (FramePack)")
    register("packforcing", PackForcing, options=PackForcingOptions,
             description="sink / top-k learned-compressed mid blocks / recent, positions repacked (PackForcing)")
