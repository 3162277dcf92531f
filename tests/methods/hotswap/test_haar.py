"""The Haar transform of hot-swap's wavelet path: perfect reconstruction and Parseval for any
channel counts (odd ones padded and cropped), 2-D and 1-D, and the conv in the Haar domain
equals the direct conv."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from rfq.methods.hotswap import haar


@settings(max_examples=40, deadline=None)
@given(co=st.integers(1, 9), ci=st.integers(1, 9), k=st.sampled_from([(), (1, 1), (3, 3)]),
       seed=st.integers(0, 2**31 - 1))
def test_2d_reconstructs_exactly_and_keeps_the_energy(co, ci, k, seed):
    w = torch.randn(co, ci, *k, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    bands = haar.forward_2d(w)
    assert bands.shape == (4, (co + 1) // 2, (ci + 1) // 2, *k)
    torch.testing.assert_close(haar.inverse_2d(bands, w.shape), w, rtol=0, atol=1e-12)
    torch.testing.assert_close(bands.pow(2).sum(), w.pow(2).sum(), rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(co=st.integers(1, 11), seed=st.integers(0, 2**31 - 1))
def test_1d_reconstructs_exactly_and_keeps_the_energy(co, seed):
    w = torch.randn(co, 1, 3, 3, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    bands = haar.forward_1d(w)
    assert bands.shape == (2, (co + 1) // 2, 1, 3, 3)
    torch.testing.assert_close(haar.inverse_1d(bands, w.shape), w, rtol=0, atol=1e-12)
    torch.testing.assert_close(bands.pow(2).sum(), w.pow(2).sum(), rtol=1e-12, atol=1e-12)


def test_bands_follow_the_stated_formulas():
    w = torch.tensor([[1.0, 2.0], [3.0, 5.0]])  # x00 x01 / x10 x11
    ll, lh, hl, hh = haar.forward_2d(w).flatten(1).squeeze(1)
    assert (ll, lh, hl, hh) == ((1 + 2 + 3 + 5) / 2, (1 - 2 + 3 - 5) / 2, (1 + 2 - 3 - 5) / 2,
                                (1 - 2 - 3 + 5) / 2)


@settings(max_examples=25, deadline=None)
@given(co=st.integers(1, 7), ci=st.integers(1, 7), stride=st.sampled_from([1, 2]),
       padding=st.sampled_from([0, 1]), seed=st.integers(0, 2**31 - 1))
def test_conv_in_the_haar_domain_equals_the_direct_conv(co, ci, stride, padding, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, ci, 7, 6, generator=g, dtype=torch.float64)
    bands = haar.forward_2d(w)
    want = F.conv2d(x, w, None, stride, padding)
    got = haar.haar_domain_conv2d(x, bands, co, stride, padding)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
