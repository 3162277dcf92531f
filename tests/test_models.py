"""rfq.models: the option-A shortcut's values and gradient layout."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from rfq.models import ShortcutA


def sliced_reference(x, pad):
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad // 2, pad - pad // 2))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 5), extra=st.integers(0, 6), h=st.integers(1, 9),
       w=st.integers(1, 9), channels_last=st.booleans())
def test_shortcut_a_is_the_strided_slice_padded(n, c, extra, h, w, channels_last):
    x = torch.randn(n, c, h, w)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y = ShortcutA(c, c + extra)(x)
    ref = sliced_reference(x.detach(), extra)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    expected = torch.zeros_like(x)
    expected[:, :, ::2, ::2] = g[:, extra // 2:extra // 2 + c]
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("channels_last", [True, False])
def test_shortcut_a_gradient_keeps_the_input_layout(channels_last):
    # the input is not a leaf, so nothing re-lays-out its gradient: a slice's backward returned
    # an NCHW gradient, which the channels_last ops before it then copied
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    leaf = torch.randn(4, 8, 12, 12).to(memory_format=fmt).requires_grad_()
    x = leaf * 2
    y = ShortcutA(8, 16)(x)
    (grad,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert grad.is_contiguous(memory_format=fmt)
    assert y.is_contiguous(memory_format=fmt)
