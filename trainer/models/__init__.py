"""Our own transformers-5 implementations of the published diffusion-LM families.

Each module defines its config and model classes under the hub's ``model_type`` and registers them
with the transformers Auto classes on import, so ``from_pretrained`` loads the published
``config.json`` and safetensors with no remote code.
"""
