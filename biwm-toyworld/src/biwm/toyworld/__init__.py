"""BiWM's embedded lab: the procedural toy world (:mod:`biwm.toyworld.world`), its dataset plugin
(:mod:`biwm.toyworld.data`), the inverse-dynamics model that judges camera following
(:mod:`biwm.toyworld.idm`, the shipped 32x32 weights under ``assets/idm``) and the toy-world
evaluation scores (:mod:`biwm.toyworld.scores`). Registered through the ``biwm`` entry point
``toyworld`` (:mod:`biwm.toyworld.plugin`); biwm-core imports none of it."""
