"""Deployment of a chosen subnet: real int8 kernels, ONNX QDQ export and latency measurement."""

from lightning_nas.deploy.int8 import (
    FloatAvgPool,
    Requantize,
    convert_to_int8,
    export_onnx,
    int8_qconfig_mapping,
    learned_activation_qparams,
    onnx_session,
    run_onnx,
    top1_agreement,
    training_weight_codes,
)
from lightning_nas.deploy.latency import compare_fp32_int8, measure_latency

__all__ = [
    "FloatAvgPool",
    "Requantize",
    "compare_fp32_int8",
    "convert_to_int8",
    "export_onnx",
    "int8_qconfig_mapping",
    "learned_activation_qparams",
    "measure_latency",
    "onnx_session",
    "run_onnx",
    "top1_agreement",
    "training_weight_codes",
]
