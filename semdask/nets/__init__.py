"""Nets: network architectures, model files and the bundled weights.

The paper's U-Net (:mod:`.unet`), a residual-encoder U-Net (:mod:`.resunet`) and model files as
safetensors + config (:mod:`.model`). Imports nothing from the stages above it.
"""
