"""Deployment targets: the CPU kind and runtime an int8 network is trained for and deployed on.

Torch-free (recipe validation reads the names). One target fixes everything that must agree:

* the fake-quantization grid of QAT and of quantized pair collection. Without VNNI, x86 int8
  kernels (oneDNN's ``jit_uni_int8:avx2``, fbgemm's depthwise kernels on every CPU, ONNX Runtime's
  MLAS u8s8 kernels) multiply u8 activations by s8 weights with ``vpmaddubsw``, which adds each pair
  of products into a saturating int16. Measured on this VNNI host with oneDNN limited to AVX2
  (``ONEDNN_MAX_CPU_ISA=AVX2``): a dense 3x3 conv with codes near 255 x 127 is off by up to 44
  output steps in 95 % of its outputs, exact with VNNI. Two products stay below 2^15 when either
  operand loses a bit: the ``*_avx2`` targets quantize 8-bit weights to 7 bits (codes -63..63;
  2 x 255 x 63 = 32,130), which, unlike 7-bit activations (PyTorch's ``reduce_range``), needs no
  clipping at run time (a runtime quantizes an activation to 0..255 whatever range it was trained
  for, so an outlier above a 7-bit range would still reach the kernel);
* the quantized engine of the torch conversion, the runtime whose int8 model is deployed and
  timed, and the runtime of int8 latency tables.

``auto`` detects the host's instruction sets (:func:`detect_isa`); ``auto/onnxruntime`` does the
same with ONNX Runtime as the runtime. The mixing rule (:func:`check_same_target`): a stage that
combines artifacts of different targets stops with a :class:`RecipeError` unless the recipe sets
``deploy.allow_mixed_targets: true``. Reading an artifact on another CPU kind is not mixing.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .errors import RecipeError

ISAS = ("x86_vnni", "x86_avx2", "arm")
RUNTIMES = ("torch", "onnxruntime")
#: Every concrete target; ARM runs torch's QNNPACK engine (ONNX Runtime on ARM is not supported).
TARGETS = ("x86_vnni/torch", "x86_avx2/torch", "x86_vnni/onnxruntime", "x86_avx2/onnxruntime", "arm/torch")
TargetName = Literal[
    "auto",
    "auto/torch",
    "auto/onnxruntime",
    "x86_vnni/torch",
    "x86_avx2/torch",
    "x86_vnni/onnxruntime",
    "x86_avx2/onnxruntime",
    "arm/torch",
]
TARGET_CHOICES = ("auto", "auto/torch", "auto/onnxruntime", *TARGETS)

_ENGINES = {"x86_vnni": "onednn", "x86_avx2": "onednn", "arm": "qnnpack"}


@dataclass(frozen=True)
class DeployTarget:
    """A concrete target (never ``auto``): ``isa/runtime``."""

    isa: str
    runtime: str

    @property
    def name(self) -> str:
        return f"{self.isa}/{self.runtime}"

    @property
    def engine(self) -> str:
        """torch's quantized engine for the conversion (also the reference for ONNX export)."""
        return _ENGINES[self.isa]

    @property
    def weight_qmax(self) -> int:
        """Largest code of an 8-bit weight: 63 where u8 x s8 pairs would saturate int16."""
        return 63 if self.isa == "x86_avx2" else 127

    @property
    def reduced_weights(self) -> bool:
        return self.weight_qmax < 127

    def __str__(self) -> str:
        return self.name


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def detect_isa(machine: str | None = None, flags: Iterable[str] | None = None) -> str:
    """The host's ISA family: ``arm``, ``x86_vnni`` (AVX-512 VNNI or AVX-VNNI) or ``x86_avx2``.

    An x86 host whose flags cannot be read is treated as ``x86_avx2``: its 7-bit weight grid is
    exact on every x86 CPU, the 8-bit one only with VNNI.
    """
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        return "arm"
    found = set(flags) if flags is not None else (_cpu_flags() or set())
    if found & {"avx512_vnni", "avx_vnni"}:
        return "x86_vnni"
    return "x86_avx2"


def host_target(runtime: str = "torch") -> DeployTarget:
    return resolve_target(f"auto/{runtime}")


def resolve_target(name: str | DeployTarget, key: str = "deploy.target") -> DeployTarget:
    """``auto``, ``auto/<runtime>`` or a concrete name -> a :class:`DeployTarget`."""
    if isinstance(name, DeployTarget):
        return name
    if name not in TARGET_CHOICES:
        raise RecipeError("unknown deployment target", key=key, given=name, allowed=", ".join(TARGET_CHOICES))
    isa, _, runtime = name.partition("/")
    runtime = runtime or "torch"
    if isa == "auto":
        isa = detect_isa()
        if isa == "arm" and runtime != "torch":
            raise RecipeError("ONNX Runtime is not a supported runtime on ARM", key=key, given=name,
                              allowed="auto, auto/torch, arm/torch")
    return DeployTarget(isa, runtime)


def host_can_run(target: str | DeployTarget) -> bool:
    """Whether this host executes ``target``'s int8 arithmetic natively.

    A VNNI host computes an ``x86_avx2`` model exactly (its 7-bit weights never saturate), so it
    counts; an AVX2-only host cannot reproduce the 8-bit VNNI grid, nor x86 an ARM one.
    """
    target = resolve_target(target)
    host = detect_isa()
    return target.isa == host or (target.isa == "x86_avx2" and host == "x86_vnni")


def check_same_target(
    found: dict[str, str | None], expected: str | None, allow_mixed: bool, key: str = "deploy.target"
) -> None:
    """The mixing rule: every artifact in ``found`` ({what: target name}) must have ``expected``'s
    target (or, with ``expected=None``, one common target). Artifacts without a recorded target
    (``None``) are older than targets and are compared with nothing. ``allow_mixed`` lets a recipe
    combine them knowingly."""
    if allow_mixed:
        return
    named = {what: target for what, target in found.items() if target is not None}
    reference = expected if expected is not None else next(iter(named.values()), None)
    odd = {what: target for what, target in named.items() if target != reference}
    if odd:
        listed = "; ".join(f"{what}: {target}" for what, target in sorted(odd.items()))
        raise RecipeError(
            f"artifacts of different deployment targets would be combined ({listed}; expected {reference}); "
            "use artifacts of one target, or set deploy.allow_mixed_targets: true to combine them anyway",
            key=key,
            given=reference,
        )
