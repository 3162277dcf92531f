"""One-level orthonormal Haar transform of a weight over its channel axes (spec
methods_seeds.md §B.2 item 3, ours).

2-D, over (C_out, C_in) at each kernel tap (convs; linear weights as (out, in)): both channel
counts are zero-padded to even, and each 2x2 block [x00 x01; x10 x11] (row = output channel,
column = input channel) becomes the four bands

    LL = (x00 + x01 + x10 + x11) / 2      LH = (x00 - x01 + x10 - x11) / 2
    HL = (x00 + x01 - x10 - x11) / 2      HH = (x00 - x01 - x10 + x11) / 2

(L/H over rows, then over columns). The transform is orthonormal and its own inverse, so
``inverse`` applies the same sums and crops the padding. 1-D, over C_out only (depthwise convs,
whose C_in per group is 1): L = (x0 + x1) / sqrt 2, H = (x0 - x1) / sqrt 2.

Plain PyTorch (a few strided views and adds), differentiable by autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

BANDS_2D = ("LL", "LH", "HL", "HH")
BANDS_1D = ("L", "H")


def _pad_channels(w: Tensor, dims: int) -> Tensor:
    """Zero-pad the first ``dims`` axes of ``w`` to even sizes."""
    pad = []
    for d in reversed(range(w.dim())):
        pad += [0, w.shape[d] % 2 if d < dims else 0]
    return F.pad(w, pad) if any(pad) else w


def forward_2d(w: Tensor) -> Tensor:
    """[C_out, C_in, *taps] -> bands [4, ceil(C_out/2), ceil(C_in/2), *taps] (LL, LH, HL, HH)."""
    if w.dim() < 2:
        raise ValueError(f"haar forward_2d: the weight needs (C_out, C_in, ...) axes, got "
                         f"shape {tuple(w.shape)}")
    x = _pad_channels(w, 2)
    x00, x01 = x[0::2, 0::2], x[0::2, 1::2]
    x10, x11 = x[1::2, 0::2], x[1::2, 1::2]
    return torch.stack([x00 + x01 + x10 + x11, x00 - x01 + x10 - x11,
                        x00 + x01 - x10 - x11, x00 - x01 - x10 + x11]) * 0.5


def inverse_2d(bands: Tensor, shape) -> Tensor:
    """Bands [4, ...] -> the weight of ``shape`` (the padding cropped)."""
    ll, lh, hl, hh = bands.unbind(0)
    x00 = (ll + lh + hl + hh) * 0.5
    x01 = (ll - lh + hl - hh) * 0.5
    x10 = (ll + lh - hl - hh) * 0.5
    x11 = (ll - lh - hl + hh) * 0.5
    top = torch.stack([x00, x01], 2).flatten(1, 2)  # rows 0::2: columns interleaved
    bottom = torch.stack([x10, x11], 2).flatten(1, 2)
    w = torch.stack([top, bottom], 1).flatten(0, 1)
    return w[: shape[0], : shape[1]]


def forward_1d(w: Tensor) -> Tensor:
    """[C_out, ...] -> bands [2, ceil(C_out/2), ...] (L, H), over C_out only."""
    x = _pad_channels(w, 1)
    x0, x1 = x[0::2], x[1::2]
    return torch.stack([x0 + x1, x0 - x1]) * (1 / math.sqrt(2))


def inverse_1d(bands: Tensor, shape) -> Tensor:
    lo, hi = bands.unbind(0)
    r = 1 / math.sqrt(2)
    w = torch.stack([(lo + hi) * r, (lo - hi) * r], 1).flatten(0, 1)
    return w[: shape[0]]


def channel_transform(x: Tensor, dim: int) -> Tensor:
    """The 1-D Haar over pairs of ``x``'s axis ``dim`` (zero-padded to even), outputs
    interleaved in place: positions 2i, 2i+1 hold (L_i, H_i). Orthonormal and its own inverse."""
    if x.shape[dim] % 2:
        pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, 1]
        x = F.pad(x, pad)
    a, b = x.unflatten(dim, (-1, 2)).unbind(dim + 1)
    r = 1 / math.sqrt(2)
    return torch.stack([(a + b) * r, (a - b) * r], dim + 1).flatten(dim, dim + 1)


def band_matrix(bands: Tensor) -> Tensor:
    """2-D bands [4, P, Q, *taps] as one weight [2P, 2Q, *taps] in the interleaved Haar basis:
    entry (2p + r, 2q + c) is band (r, c) with r, c = 0 for L, 1 for H."""
    ll, lh, hl, hh = bands.unbind(0)
    top = torch.stack([ll, lh], 2).flatten(1, 2)
    bottom = torch.stack([hl, hh], 2).flatten(1, 2)
    return torch.stack([top, bottom], 1).flatten(0, 1)


def haar_domain_conv2d(x: Tensor, bands: Tensor, c_out: int, stride=1, padding=0,
                       dilation=1) -> Tensor:
    """conv2d(x, inverse_2d(bands)) computed in the Haar domain: the input channels
    transformed, a conv with the band matrix, the output channels transformed back. The conv
    reads the (quantized) bands themselves: a b-bit weight's exact fast path."""
    xh = channel_transform(x, 1)
    y = F.conv2d(xh, band_matrix(bands), None, stride, padding, dilation)
    return channel_transform(y, 1)[:, :c_out]


__all__ = ["BANDS_2D", "BANDS_1D", "forward_2d", "inverse_2d", "forward_1d", "inverse_1d",
           "channel_transform", "band_matrix", "haar_domain_conv2d"]
