"""Entry point of biwm-data: the ``videos`` dataset and the ``biwm data import | cache | inspect``
commands (sharing the ``data`` group with other plugins' subcommands). Imports stay inside the
hooks, so loading the plugin imports neither PyAV nor torch."""

from biwm.core import hookimpl


@hookimpl
def register_datasets(register):
    from biwm.data.dataset import VideosData, VideosDataset

    register("videos", VideosDataset, options=VideosData,
             description="an imported dataset (biwm data import): real videos with cameras, actions and captions, "
                         "read from its latent cache when one matches")


@hookimpl
def register_commands(register):
    from biwm.data.cli import data_app

    register("data", data_app, description="Data sets: import videos with cameras, cache latents, inspect.")
