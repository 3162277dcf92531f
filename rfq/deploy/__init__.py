"""Deployment: a quantized model at one bit config as one safetensors file of packed codes
(``export``; ``export_specs`` for methods that quantize layers themselves), rebuilt from that
file alone (``load``), and measured (``rfq.deploy.bench``)."""

from rfq.deploy.export import (DeployFormatError, LayerSpec, assemble, export, export_specs,
                               export_tensors, file_sizes, infer_arch, keep_dense_weights, load,
                               to_packed)

__all__ = ["DeployFormatError", "LayerSpec", "assemble", "export", "export_specs",
           "export_tensors", "file_sizes", "infer_arch", "keep_dense_weights", "load",
           "to_packed"]
