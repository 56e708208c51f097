"""Entry point of biwm-backbones: registers the backbones whose optional dependencies are present."""

from biwm.core import hookimpl


@hookimpl
def register_backbones(register):
    from biwm.backbones.wan import WanOptions, build_wan

    register("wan", build_wan, options=WanOptions,
             description="Wan2.1/Wan2.2 video DiT via diffusers (presets: tiny, toy, wan2.1-t2v-1.3b, wan2.2-ti2v-5b)")

    from biwm.backbones.hunyuan import HunyuanOptions, build_hunyuan

    register("hunyuan", build_hunyuan, options=HunyuanOptions,
             description="HunyuanVideo-1.5 video DiT via diffusers (presets: tiny, hunyuanvideo-1.5-480p)")

    from biwm.backbones.ltx import LTXOptions, build_ltx

    register("ltx", build_ltx, options=LTXOptions,
             description="LTX-2.3 video DiT via diffusers, its video stream (presets: tiny, ltx-2.3-22b)")
