"""Entry point of biwm-play: the ``biwm play`` command. Imports stay inside the hook, so loading the
plugin imports neither the server nor torch."""

from biwm.core import hookimpl


@hookimpl
def register_commands(register):
    from biwm.play.cli import play

    register("play", play, description="Drive a world model from the keyboard in a local web page.")
