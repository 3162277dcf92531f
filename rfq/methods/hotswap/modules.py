"""Hot-swap layers: a QuantConv2d / QuantLinear with candidates 8..1 whose weight at 3, 2 and 1
bits goes through the wavelet path (spec methods_seeds.md §B.2 items 2-3; ours, inspired by
One Model for All, arXiv 2105.01353).

- b >= 4, the direct path: the main method's per-bit LSQ step (``rfq.ops.coupled_quant``).
- b <= 3, the wavelet path: the weight's one-level Haar bands (haar.py; 2-D over (C_out, C_in),
  1-D over C_out for depthwise convs) each quantized at b bits with its own learned step (at 1
  bit sign * s), then the inverse transform. The result has more than 2^b distinct values.

Steps of the wavelet path are ``band_steps`` [wavelet bits, bands]; which row is used is a 0-dim
``band_sel`` buffer like ``w_sel``, so switching bits neither syncs the host nor reallocates.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from rfq.methods.hotswap import haar
from rfq.nn import QuantConfig, quantize_
from rfq.nn.modules import MIN_STEP, QuantConv2d, QuantLinear, _quantizer, weight_steps_init

HOTSWAP_BITS = (8, 7, 6, 5, 4, 3, 2, 1)
WAVELET_MAX_BITS = 3  # bits at or below this use the wavelet path
# weight layers the hot swap would leave in float: refused rather than silently not switched
NO_WAVELET_RULE = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d)


@torch.no_grad()
def band_steps_init(bands: Tensor, bits) -> Tensor:
    """[len(bits), bands]: b >= 2 as the direct path's init per band; 1 bit: mean|band|."""
    rows = []
    for b in bits:
        if b == 1:
            rows.append(torch.stack([band.abs().mean().clamp_min(MIN_STEP) for band in bands]))
        else:
            rows.append(torch.stack([weight_steps_init(band, [b])[0] for band in bands]))
    return torch.stack(rows).float()


class _HotSwap:
    """The wavelet path, mixed into QuantConv2d / QuantLinear."""

    def _setup_wavelet(self, wavelet: bool) -> None:
        self.wavelet_bits = [b for b in self.w_bits if b <= WAVELET_MAX_BITS] if wavelet else []
        self.one_d = getattr(self, "groups", 1) > 1 and self.weight.shape[1] == 1
        bands = self.transform(self.weight.detach().float())
        self.band_steps = nn.Parameter(band_steps_init(bands, self.wavelet_bits or [2]),
                                       requires_grad=bool(self.wavelet_bits))
        self.register_buffer("band_sel", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("band_used", torch.zeros(len(self.band_steps), dtype=torch.bool),
                             persistent=False)
        self.register_buffer("frozen", None, persistent=False)  # see freeze()

    def transform(self, w: Tensor) -> Tensor:
        return haar.forward_1d(w) if self.one_d else haar.forward_2d(w)

    def inverse(self, bands: Tensor) -> Tensor:
        shape = self.weight.shape
        return haar.inverse_1d(bands, shape) if self.one_d else haar.inverse_2d(bands, shape)

    @property
    def uses_wavelet(self) -> bool:
        return self.w_bit in self.wavelet_bits

    def quantized_bands(self) -> Tensor:
        """The quantized Haar bands at the current (wavelet) bit-width."""
        bands = self.transform(self.weight)
        gs = self._grad_scale(bands[0].numel(), self.w_bit, True)
        return torch.stack([_quantizer[0](band, self.band_steps[:, j], self.wavelet_bits,
                                          self.band_sel, True, gs)
                            for j, band in enumerate(bands.unbind(0))])

    def quantized_weight(self) -> Tensor:
        if self.weight_cache is not None or not self.uses_wavelet:
            return super().quantized_weight()
        return self.inverse(self.quantized_bands())

    def set_bits(self, w=None, a=None) -> None:
        super().set_bits(w, a)
        if w is not None and w in self.wavelet_bits:
            self.band_sel.fill_(self.wavelet_bits.index(w))

    def _mark_used(self) -> None:
        if self.uses_wavelet and self._marked != (self.w_index, self.a_index):
            self.band_used[self.wavelet_bits.index(self.w_bit)].fill_(True)
        super()._mark_used()

    def clear_usage(self) -> None:
        super().clear_usage()
        self.band_used.zero_()

    def masked_entries(self):
        entries = super().masked_entries()
        if len(self.band_steps) > 1:
            entries.append((self.band_steps, "band_used"))
        return entries

    def clamp_steps_(self) -> None:
        super().clamp_steps_()
        with torch.no_grad():
            self.band_steps.clamp_(min=MIN_STEP)

    @torch.no_grad()
    def freeze(self) -> None:
        """Quantize the weight at every bit once and keep them stacked [K, ...]: in eval mode
        the forward then picks its weight and its input step by the device selectors alone
        (no host value), so a torch.compile'd model switches bits without recompiling. Call
        again after the weights change; ``unfreeze`` drops them."""
        self.fill_weight_cache()
        self.frozen, self.weight_cache = torch.stack(self.weight_cache), None

    def unfreeze(self) -> None:
        self.frozen = None

    def forward(self, x: Tensor) -> Tensor:
        if self.frozen is None or self.training or not self.quant_enabled:
            return super().forward(x)
        if self.a_bits:
            x = _quantizer[0](x, self.a_steps, self.a_bits, self.a_sel, self.a_signed, 1.0)
        return self.compute(x, self.frozen.index_select(0, self.w_sel.view(1)).squeeze(0))

    @torch.no_grad()
    def fill_weight_cache(self) -> None:
        """Every bit's quantized weight, the wavelet bits through their bands (the base class's
        one multi-bit call knows only the direct path)."""
        self.weight_cache, weights = None, []
        keep = self.w_bit
        for b in self.w_bits:
            self.set_bits(b, None)
            weights.append(torch.empty_like(self.weight).copy_(self.quantized_weight()))
        self.set_bits(keep, None)
        self.weight_cache = weights

    def extra_repr(self) -> str:
        wave = f", wavelet at {self.wavelet_bits} ({'1-D' if self.one_d else '2-D'} Haar)" \
            if self.wavelet_bits else ", no wavelet path"
        return super().extra_repr() + wave


class HotSwapConv2d(_HotSwap, QuantConv2d):
    def __init__(self, conv: nn.Conv2d, w_bits, a_bits=(), a_signed: bool = False,
                 role: str = "mixed", lsq_grad_scale: bool = False, wavelet: bool = True):
        super().__init__(conv, w_bits, a_bits, a_signed, role, lsq_grad_scale)
        self._setup_wavelet(wavelet)


class HotSwapLinear(_HotSwap, QuantLinear):
    def __init__(self, linear: nn.Linear, w_bits, a_bits=(), a_signed: bool = False,
                 role: str = "mixed", lsq_grad_scale: bool = False, wavelet: bool = True):
        super().__init__(linear, w_bits, a_bits, a_signed, role, lsq_grad_scale)
        self._setup_wavelet(wavelet)


def freeze(model: nn.Module) -> nn.Module:
    """Every hot-swap layer's weights at every bit, kept (``_HotSwap.freeze``): for switching
    bits in eval mode, compiled or not, without recompiling or reading a device value."""
    for m in model.modules():
        if isinstance(m, _HotSwap):
            m.freeze()
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, _HotSwap):
            m.unfreeze()
    return model


def hotswap_config(bits=HOTSWAP_BITS) -> QuantConfig:
    """Every mixed layer (depthwise too) at candidates ``bits`` for weight and input; stem W8
    with the image unquantized and FC W8A8 (spec §B.2 item 1)."""
    return QuantConfig(bits=tuple(bits), depthwise_bits=tuple(bits), first_bits=8, last_bits=8)


def hotswap_(model: nn.Module, bits=HOTSWAP_BITS, wavelet: bool = True) -> nn.Module:
    """``rfq.quantize_`` with hot-swap layers: in place; ``model.set_bits(b)`` switches every
    layer (and its BN copy) to W b / A b. ``wavelet=False``: the direct path at every bit (the
    ablation)."""
    for b in bits:
        if not 1 <= b <= 8:
            raise ValueError(f"hot-swap bits must be in 1..8, got {b}")
    for name, m in model.named_modules():
        if isinstance(m, NO_WAVELET_RULE):
            raise ValueError(f"hotswap_: layer {name!r} is a {type(m).__name__}, which has no "
                             f"wavelet rule (hot-swap layers cover Conv2d, depthwise Conv2d and "
                             f"Linear); nothing was changed")
    quantize_(model, hotswap_config(bits),
              conv_type=functools.partial(HotSwapConv2d, wavelet=wavelet),
              linear_type=functools.partial(HotSwapLinear, wavelet=wavelet))
    return model


__all__ = ["HOTSWAP_BITS", "WAVELET_MAX_BITS", "HotSwapConv2d", "HotSwapLinear",
           "band_steps_init", "freeze", "hotswap_", "hotswap_config", "unfreeze"]
