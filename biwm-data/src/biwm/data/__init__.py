"""BiWM real data (biwm-data): ``biwm data import`` (videos + camera files in a peer's format -> a
dataset folder), ``biwm data cache`` (latents and text embeddings of a backbone, sharded
safetensors), ``biwm data inspect``, and the ``videos`` dataset that recipes train on."""
