"""Fake quantizers for quantization-aware training (APQ-style mixed precision).

Two quantizers share one functional core, :func:`fake_quantize`:

* :class:`WeightQuantizer`: symmetric, per output channel (dimension 0 of the weight), scale taken
  from the channel's largest magnitude. Per-channel symmetric quantization commutes with a positive
  or negative per-channel rescaling, so folding batch norm into the convolution at deploy time
  leaves the integer weights unchanged: the int8 model sees the same grid as training did.
* :class:`ActivationQuantizer`: PACT. The clipping value ``alpha`` is a learned parameter; inputs
  are clipped to ``[0, alpha]`` (unsigned, for inputs that follow a ReLU) or, signed (e.g. after
  h-swish, on normalized images or on a residual sum), to the grid ``alpha / qmax * {-qmax - 1,
  ..., qmax}``, the codes of an int8 tensor with zero point 128, and rounded to the grid.
  ``alpha`` receives PACT's clipping gradient (1 for every clipped element) and, because rounding
  goes through the straight-through estimator rather than being treated as a constant, also the
  rounding-residual term that LSQ uses; the gradient is scaled as in LSQ (1 / sqrt(features *
  qmax)) so that ``alpha`` can share the learning rate of the weights without exploding.

Bit widths are plain attributes (``quantizer.bits = 4``), so a policy change at run time takes
effect on the next forward pass; ``None`` or ``32`` means full precision (the quantizer is an
identity). Quantizers keep no per-shape state, which is what lets them sit inside elastic layers
whose active weight changes shape with the sampled subnet.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Bit widths a quantizer accepts; ``None`` and :data:`FULL_PRECISION` disable quantization.
MIN_BITS = 2
MAX_BITS = 8
FULL_PRECISION = 32

# Keeps scales strictly positive for all-zero channels (e.g. pruned ones) and zero clip values.
_EPS = 1e-8


def check_bits(bits: int | None) -> int | None:
    """Validate a bit width; return ``None`` for full precision."""
    if bits is None or bits == FULL_PRECISION:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"bit width must be an int in [{MIN_BITS}, {MAX_BITS}], or None / {FULL_PRECISION} "
            f"for full precision; got {bits!r}"
        )
    return bits


class _FakeQuantize(torch.autograd.Function):
    """One node instead of the div/clamp/round/STE chain: saves a single tensor for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:  # type: ignore[override]
        # torch's int8 kernels multiply by the inverse of the scale rather than dividing; the two
        # differ by an ulp often enough to flip exact .5 ties (sums of grid values are full of
        # them), so the fake quantizer rounds the same way.
        scaled = x * (1.0 / scale)
        ctx.save_for_backward(scaled, scale)
        ctx.qrange = (qmin, qmax)
        return torch.clamp(torch.round(scaled), qmin, qmax) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]  # noqa: ANN205
        scaled, scale = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        inside = (scaled >= qmin) & (scaled <= qmax)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # d(s * clamp(round(x/s))) / ds with the STE on round: round(x/s) - x/s inside the
            # range, the bound itself outside.
            local = torch.where(inside, torch.round(scaled) - scaled, torch.clamp(scaled, qmin, qmax))
            grad_scale = (grad * local).sum_to_size(scale.shape)
        return grad_x, grad_scale, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize ``x`` onto the grid ``scale * {qmin, ..., qmax}`` and return it in float.

    Rounding (half to even, as the int8 kernels do) uses the straight-through estimator and the
    clamp is a real clamp, so ``x`` gets gradient 1 inside the range and 0 outside (the PACT rule),
    while ``scale`` gets ``round(x/s) - x/s`` inside and ``qmin``/``qmax`` outside (the LSQ rule).
    ``scale`` must broadcast against ``x``.
    """
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=x.dtype, device=x.device)
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        # Without autograd the same arithmetic runs in place on one buffer: 3x faster than the
        # chain of new tensors on CPU (PTQ benchmarks, evaluation), bit for bit the same values.
        out = x * (1.0 / scale)
        out.round_().clamp_(qmin, qmax)
        return out.mul_(scale)
    return _FakeQuantize.apply(x, scale, qmin, qmax)


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by ``factor`` in the backward pass."""
    return (x - x * factor).detach() + x * factor


def symmetric_qrange(bits: int) -> tuple[int, int]:
    """Integer range of a symmetric signed grid; -2^(b-1) is left out to keep it symmetric."""
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax


def signed_activation_qrange(bits: int) -> tuple[int, int]:
    """Integer range of a signed activation grid: all of ``[-2^(b-1), 2^(b-1) - 1]``.

    An 8-bit signed activation deploys as quint8 with zero point 128, whose codes reach -128;
    clipping at -127 in training would disagree with the int8 model on every value below it.
    """
    qmax = 2 ** (bits - 1) - 1
    return -qmax - 1, qmax


def unsigned_qrange(bits: int) -> tuple[int, int]:
    return 0, 2**bits - 1


class WeightQuantizer(nn.Module):
    """Symmetric per-output-channel weight fake quantizer with a straight-through estimator.

    Usable directly (``w_q = quantizer(w)``) or as a ``torch.nn.utils.parametrize``
    parametrization of a ``weight``. The scale is recomputed from the weight at every call and
    detached, so gradients reach the float weight unchanged (pure STE; nothing is clipped since the
    scale covers the largest magnitude).

    ``reduce_range`` quantizes 8-bit weights to 7 bits (codes -63..63), the grid of deployment
    targets without VNNI, whose int8 kernels add pairs of u8 x s8 products into a saturating
    int16 (see :mod:`lightning_nas.targets`); narrower widths already fit and are unchanged.
    """

    def __init__(self, bits: int | None = 8, reduce_range: bool = False) -> None:
        super().__init__()
        self._bits = check_bits(bits)
        self.reduce_range = bool(reduce_range)

    @property
    def bits(self) -> int | None:
        return self._bits

    @bits.setter
    def bits(self, value: int | None) -> None:
        self._bits = check_bits(value)

    def qrange(self) -> tuple[int, int]:
        """Integer range of the weight codes at the current bits."""
        if self._bits is None:
            raise RuntimeError("a full-precision WeightQuantizer has no integer range")
        return symmetric_qrange(7 if self.reduce_range and self._bits == 8 else self._bits)

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-output-channel scale, shaped to broadcast against ``weight``."""
        if self._bits is None:
            raise RuntimeError("a full-precision WeightQuantizer has no scale")
        _, qmax = self.qrange()
        max_abs = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1).clamp_min(_EPS)
        return (max_abs / qmax).reshape((-1,) + (1,) * (weight.dim() - 1))

    @torch.no_grad()
    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The integers the fake-quantized weight stands for (``forward = codes * scale``)."""
        if self._bits is None:
            raise RuntimeError("a full-precision WeightQuantizer has no integer codes")
        scale = self.scale(weight)
        return torch.round(fake_quantize(weight.detach(), scale, *self.qrange()) / scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self._bits is None:
            return weight
        qmin, qmax = self.qrange()
        quantized = fake_quantize(weight.detach(), self.scale(weight), qmin, qmax)
        # Whole-tensor STE: the scale covers the largest magnitude, so clamping never applies in
        # exact arithmetic, but a float ulp can push the extreme weight past qmax and the clamp
        # would then zero its gradient.
        return weight + (quantized - weight).detach()

    def extra_repr(self) -> str:
        return f"bits={self._bits}" + (", reduce_range=True" if self.reduce_range else "")


class ActivationQuantizer(nn.Module):
    """PACT activation fake quantizer with a learned clipping value ``alpha``.

    ``signed=None`` leaves the sign to be decided from data: by
    :func:`lightning_nas.nn.quantize_model.calibrate_activation_ranges` or, failing that, by the
    first batch that reaches a quantizing forward (negative values seen -> signed). The same first
    batch initialises ``alpha`` when no calibration ran. Calibrate explicitly under DDP so that all
    ranks start from the same ``alpha``.
    """

    alpha: nn.Parameter
    initialized: torch.Tensor

    def __init__(
        self,
        bits: int | None = 8,
        signed: bool | None = None,
        init_alpha: float | None = None,
        init_percentile: float = 99.99,
        lsq_grad_scale: bool = True,
    ) -> None:
        super().__init__()
        self._bits = check_bits(bits)
        self.signed = signed
        self.init_percentile = init_percentile
        self.lsq_grad_scale = lsq_grad_scale
        self.alpha = nn.Parameter(torch.tensor(1.0 if init_alpha is None else float(init_alpha)))
        # A buffer rather than a Python flag so that a loaded checkpoint skips the data-driven init;
        # the Python mirror avoids reading a device tensor (a GPU sync) on every forward.
        self.register_buffer("initialized", torch.tensor(init_alpha is not None and signed is not None))
        self._init_checked = False

    @property
    def bits(self) -> int | None:
        return self._bits

    @bits.setter
    def bits(self, value: int | None) -> None:
        self._bits = check_bits(value)

    def qrange(self) -> tuple[int, int]:
        if self._bits is None:
            raise RuntimeError("a full-precision ActivationQuantizer has no integer range")
        return signed_activation_qrange(self._bits) if self.signed else unsigned_qrange(self._bits)

    def scale(self) -> torch.Tensor:
        """Step size of the grid: ``alpha / qmax``."""
        _, qmax = self.qrange()
        return self.alpha.abs().clamp_min(_EPS) / qmax

    @torch.no_grad()
    def set_range(self, alpha: float, signed: bool) -> None:
        """Set the clipping value and sign from observed statistics."""
        self.alpha.fill_(max(float(alpha), _EPS))
        self.signed = bool(signed)
        self.initialized.fill_(True)
        self._init_checked = True

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        signed = bool(x.min() < 0) if self.signed is None else self.signed
        self.set_range(observed_clip(x, signed, self.init_percentile), signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bits is None:
            return x
        if not self._init_checked:
            if not bool(self.initialized):
                self._init_from(x)
            self._init_checked = True
        qmin, qmax = self.qrange()
        alpha = self.alpha
        if self.lsq_grad_scale and alpha.requires_grad:
            features = max(x[0].numel() if x.dim() > 1 else x.numel(), 1)
            alpha = _scale_grad(alpha, 1.0 / math.sqrt(features * qmax))
        scale = alpha.abs().clamp_min(_EPS) / qmax
        return fake_quantize(x, scale, qmin, qmax)

    # The sign is part of the learned range, so it travels with ``alpha`` in checkpoints.
    def get_extra_state(self) -> dict:
        return {"signed": self.signed}

    def set_extra_state(self, state: dict) -> None:
        self.signed = state.get("signed", self.signed)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._init_checked = False

    def extra_repr(self) -> str:
        return f"bits={self._bits}, signed={self.signed}"


@torch.no_grad()
def observed_clip(x: torch.Tensor, signed: bool, percentile: float = 99.99) -> float:
    """Clipping value covering ``percentile`` % of ``x`` (magnitudes if signed, values if not).

    The order statistic is found with ``topk`` (only the largest few values are needed for a high
    percentile), which is much cheaper than ``torch.quantile``'s full sort on activation maps.
    ``percentile >= 100`` gives the maximum.
    """
    values = x.detach().float().reshape(-1)
    values = values.abs() if signed else values.clamp_min(0)
    n = values.numel()
    if n == 0:
        return _EPS
    if percentile >= 100:
        return float(values.max())
    k = min(n, max(1, math.ceil(n * (1.0 - percentile / 100.0))))
    return float(torch.topk(values, k, sorted=False).values.min())
