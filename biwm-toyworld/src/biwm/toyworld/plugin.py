"""Entry point of biwm-toyworld: the ``toyworld`` dataset (the default of a recipe's ``data:``) and
the ``biwm data`` / ``biwm idm`` commands. Imports stay inside the hooks, so loading the plugin
imports neither the renderer nor torch."""

from biwm.core import hookimpl


@hookimpl
def register_datasets(register):
    from biwm.toyworld.data import ToyWorldData, ToyWorldDataset

    register("toyworld", ToyWorldDataset, options=ToyWorldData,
             description="the procedural toy world: rendered clips with true cameras and actions (the lab)")


@hookimpl
def register_commands(register):
    from biwm.toyworld.cli import data_app, idm_app

    register("data", data_app, description="Data sets: toyworld renders toy-world clips to disk.")
    register("idm", idm_app, description="The inverse-dynamics model that scores camera following.")
