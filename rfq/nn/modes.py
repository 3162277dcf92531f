"""Temporary module modes as context managers: each sets a mode on every layer it concerns and
restores what was there on exit (also when the block raises), so no caller flips a module's
flags by hand and forgets one."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from rfq import ops
from rfq.nn.modules import QuantConv2d, QuantLayer, SwitchableBatchNorm2d


def _quant_layers(model: nn.Module) -> list[QuantLayer]:
    return [m for m in model.modules() if isinstance(m, QuantLayer)]


@contextlib.contextmanager
def float_layers(model: nn.Module):
    """Every quantized layer computes in float (no quantizer runs, no activation step is
    initialised): cost probes and float baselines."""
    saved = {m: m.quant_enabled for m in _quant_layers(model)}
    try:
        for m in saved:
            m.quant_enabled = False
        yield model
    finally:
        for m, enabled in saved.items():
            m.quant_enabled = enabled


@contextlib.contextmanager
def bn_batch_statistics(model: nn.Module):
    """Train-mode BatchNorms normalize with the batch's statistics and leave their running
    statistics as they are (search scoring)."""
    switchable = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    plain = {m: m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    saved = {m: m.batch_stats_only for m in switchable}
    try:
        for m in switchable:
            m.batch_stats_only = True
        for m in plain:
            m.momentum = 0.0
        yield model
    finally:
        for m, value in saved.items():
            m.batch_stats_only = value
        for m, momentum in plain.items():
            m.momentum = momentum


@contextlib.contextmanager
def bn_recalibration(model: nn.Module):
    """Every BatchNorm's running statistics are reset and then become the plain average over the
    train-mode forwards run inside the block (BN recalibration)."""
    switchable = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    plain = {m: m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    saved = {m: (m.cumulative, m.batch_stats_only) for m in switchable}
    try:
        for m in switchable:
            m.reset_running_stats()
            m.cumulative, m.batch_stats_only = True, False
        for m in plain:
            m.reset_running_stats()
            m.momentum = None  # PyTorch's cumulative moving average
        yield model
    finally:
        for m, (cumulative, batch_stats_only) in saved.items():
            m.cumulative, m.batch_stats_only = cumulative, batch_stats_only
        for m, momentum in plain.items():
            m.momentum = momentum


@contextlib.contextmanager
def train_mode_without_dropout(model: nn.Module):
    """Train mode (BatchNorms use batch statistics) with every dropout off, so a forward is a
    deterministic function of the batch: search scoring and BN recalibration. The training
    flags of all modules are restored on exit."""
    saved = {m: m.training for m in model.modules()}
    try:
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        yield model
    finally:
        for m, training in saved.items():
            m.training = training


@contextlib.contextmanager
def cached_weights(model: nn.Module):
    """Every quantized layer makes its K quantized weights once (``coupled_quant_multi``) and
    reads them from there: inference loops over many bit configurations (the search)."""
    layers = _quant_layers(model)
    try:
        for m in layers:
            m.fill_weight_cache()
        yield model
    finally:
        for m in layers:
            m.weight_cache = None


@contextlib.contextmanager
def integer_convs(model: nn.Module, cache_weights: bool = True):
    """Inside the block, every fp32 conv whose input is quantized unsigned (after a ReLU) computes
    its no-grad forwards from integer codes: its input quantizer's codes and the selected
    weight's codes (``ops.integer_conv2d``), the K weights prepacked once when
    ``cache_weights``, else re-quantized every forward. Only where that is fast
    (``ops.integer_conv_fast``); elsewhere, and for every other layer, nothing changes. Results
    agree with the float convolution of the fake-quantized tensors to fp32 rounding (which the
    quantizers after it can amplify into different codes, as a different conv algorithm can)."""
    layers = [m for m in _quant_layers(model)
              if isinstance(m, QuantConv2d) and m.input_clamps_at_zero and all(m.a_ready)
              and m.weight.dtype == torch.float32 and ops.integer_conv_fast(m.weight.device)
              # not subclasses with their own forward, input quantizer or weight (hot-swap, CSQ)
              and type(m).forward is QuantLayer.forward
              and type(m).quantize_input is QuantLayer.quantize_input
              and type(m).quantized_weight is QuantLayer.quantized_weight]
    try:
        for m in layers:
            m.start_integer_convs(cache_weights)
        yield model
    finally:
        for m in layers:
            m.stop_integer_convs()
