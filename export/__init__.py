"""ONNX export, parity checks and the model-bundle format.

`export.bundle` is the contract between training and serving and must never import torch;
`export.onnx` (torch) writes bundles, `stream` reads them.
"""
