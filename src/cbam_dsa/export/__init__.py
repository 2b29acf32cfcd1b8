"""Deployment helpers: ONNX (both exporters), TorchScript and ``torch.export`` for the block or any model holding it.

* :func:`export_onnx` writes an ONNX file with either exporter: the TorchScript-based one (``dynamo=False``,
  opset 17 by default) or the ``torch.export``-based one (``dynamo=True``, opset 18 or later), with dynamic
  batch, height and width unless told otherwise.
* :func:`verify_onnx` runs the file in onnxruntime and compares every output with PyTorch's.
* :func:`export_torchscript` writes a **traced** TorchScript module, and :func:`verify_torchscript` checks it.
  Scripting (``torch.jit.script``) cannot compile the block: its forward is ordinary typed Python (PEP 604
  unions, ``tuple[Tensor, ...]``, argument validation with ``isinstance``, tensors or floats in one argument),
  which the TorchScript compiler does not accept. The block has no data-dependent control flow, so a trace
  records it exactly; the checks on the input's shape run once, at trace time.
* :func:`export_program` returns (and optionally saves) a ``torch.export.ExportedProgram``.

The graph never contains adaptive max pooling: the reference path pools with ``amax``, which exports as
``ReduceMax`` (:func:`onnx_op_types` lists the operators of a file). Every exporter sees the reference path.
Modules are exported in eval mode (the block behaves the same in both modes) and put back in the mode they
were in. ``onnx``, ``onnxruntime`` and ``onnxscript`` are imported only when needed: ``pip install
'cbam-dsa[export]'``.

The package's modules: ``onnx`` (ONNX export, verification and operator listing), ``torchscript`` (tracing and
its check), ``program`` (``torch.export``) and ``_common`` (what they share: argument checks, eval mode, output
names, comparing outputs). Import from the package: every name of ``__all__`` is here.
"""

from __future__ import annotations

from ._common import BLOCK_OUTPUT_NAMES, ExportError, output_names_for
from .onnx import DYNAMO_MIN_OPSET, LEGACY_DEFAULT_OPSET, export_onnx, onnx_op_types, verify_onnx
from .program import export_program
from .torchscript import export_torchscript, verify_torchscript

__all__ = [
    "BLOCK_OUTPUT_NAMES",
    "DYNAMO_MIN_OPSET",
    "LEGACY_DEFAULT_OPSET",
    "ExportError",
    "export_onnx",
    "export_program",
    "export_torchscript",
    "onnx_op_types",
    "output_names_for",
    "verify_onnx",
    "verify_torchscript",
]
