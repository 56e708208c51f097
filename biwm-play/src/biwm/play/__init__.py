"""biwm play: drive a saved world model from the keyboard in a local web page (Starlette + uvicorn,
frames over a WebSocket). :mod:`biwm.play.keys` maps held keys to actions, :mod:`biwm.play.server`
is the page's server, :mod:`biwm.play.cli` the ``biwm play`` command."""
