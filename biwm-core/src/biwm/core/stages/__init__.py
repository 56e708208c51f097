"""The built-in stages a recipe can run: one module each, holding the stage's config model (light:
no heavy import at module level) and its ``run(ctx, config, stage_dir)``, whose heavy imports are
inside it. They are registered like a plugin's stages, through ``register_stages`` in
:mod:`biwm.core.builtins` (each runner as a lazy ``"module:run"``); recipes and the runner look
stages up in the plugin registry (``get_plugin_manager().registry("stage")``), never here, so
this package imports nothing.
"""
