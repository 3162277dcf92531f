"""Float model definitions (no torchvision): ResNet-20 (CIFAR-style, 28x28 1-channel stem),
a small CNN for tests, ResNet-18 and MobileNetV2 for GPU-sized runs.

Every model exposes ``stages()``: an ordered list of modules whose composition is the forward
pass, each taking exactly the previous stage's output. The search uses it to re-run only the
stages after a changed layer (a layer's stage is found from its module name). ``rfq.quantize_``
turns these float models into weight-coupled ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StagedModel(nn.Module):
    """A model whose forward is ``stages()`` applied in order."""

    def stages(self) -> list[nn.Module]:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def forward(self, x):
        for stage in self.stages():
            x = stage(x)
        return x


class Head(nn.Module):
    """(ReLU,) global average pooling, optional dropout, then the classifier. ``relu``: the
    input is a residual stage's pre-activation sum."""

    def __init__(self, features: int, classes: int, dropout: float = 0.0, relu: bool = False):
        super().__init__()
        self.relu = relu
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(features, classes)

    def forward(self, x):
        if self.relu:
            x = F.relu(x)
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def input_clamps_at_zero(layer: nn.Module) -> bool:
    """Whether ``layer`` now quantizes its input unsigned, i.e. clamps it at 0 itself. A ReLU
    whose output feeds only such a layer can be skipped: clamp(round(x/s), 0, Qp) is the same
    for x and relu(x), and so are the LSQ gradients to x (0 below 0) and to the step (Qn = 0
    below 0, round(0) - 0 = 0 at 0). It saves a read and a write of the activation each way
    (ResNet-20 step: ~4 % of the time)."""
    return bool(getattr(layer, "input_clamps_at_zero", False))


def relu_into(layer: nn.Module, s):
    """``(relu(s), layer(relu(s)))``: a quantized layer whose input quantizer clamps at zero
    makes the ReLU output and its quantized input in one fused op."""
    fused = getattr(layer, "forward_after_relu", None)
    if fused is not None:
        return fused(s)
    x = F.relu(s)
    return x, layer(x)


def norm_add(bn: nn.Module, x, residual):
    """``bn(x) + residual``: a switchable BN runs both as one fused op while training."""
    fused = getattr(bn, "forward_add", None)
    return fused(x, residual) if fused is not None else bn(x) + residual


def norm_into(layer: nn.Module, bn: nn.Module, x):
    """``layer(bn(x))`` for a layer that clamps its input at zero itself (a ReLU between them
    was dropped): quantized layers run BN and their input quantizer as one fused op."""
    fused = getattr(layer, "forward_after_norm", None)
    return fused(bn, x) if fused is not None else layer(bn(x))


def conv_bn_relu(c_in, c_out, kernel=3, stride=1, groups=1, relu=nn.ReLU):
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out)]
    if relu is not None:
        # not in place: IDM compares the BN's output itself (before the ReLU), which an in-place
        # ReLU would overwrite after its teacher copy was kept
        layers.append(relu())
    return nn.Sequential(*layers)


# ---- ResNet-20 (CIFAR-style, option-A shortcuts) ---------------------------------------------


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.pad = c_out - c_in

    def forward(self, x):
        # x[:, :, ::2, ::2] as a 1x1 average pool: the same values, and a gradient in x's memory
        # format (the slice's backward makes an NCHW one, which channels_last consumers copy)
        x = F.avg_pool2d(x, 1, 2)
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """Takes and returns pre-activation sums: the ReLU of the previous block's output runs here,
    first, so that it and conv1's input quantizer can be one fused op (relu_into); the stage
    before the first block and the head after the last one leave it to the blocks."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(c_in, c_out)
        else:  # option B: 1x1 conv + BN (ResNet-18)
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, s):
        x, out = relu_into(self.conv1, s)
        if input_clamps_at_zero(self.conv2):  # conv2's quantizer is this ReLU
            out = norm_into(self.conv2, self.bn1, out)
        else:
            out = self.conv2(F.relu(self.bn1(out)))
        return norm_add(self.bn2, out, self.shortcut(x))


class ResNet20(StagedModel):
    """CIFAR-style ResNet-20: 3x3 stem 16 ch, 3 stages of 3 basic blocks (16/32/64 ch), GAP, FC.
    At 28x28 input the stages run at 28/14/7 px; 18 convs besides the stem. Stages pass
    pre-activation sums (see BasicBlock): the stem's ReLU runs in the first block."""

    def __init__(self, in_channels: int = 1, classes: int = 10, width: int = 16,
                 blocks_per_stage: int = 3):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, width, relu=None)
        blocks, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = Head(c_in, classes, relu=True)
        init_weights(self)

    def stages(self):
        return [self.stem, *self.blocks, self.head]


# ---- small CNN for tests (digits 8x8, Fashion-MNIST 28x28) -----------------------------------


class SmallCNN(StagedModel):
    """stem conv -> two mixed 3x3 convs (the second strided) -> GAP -> FC."""

    def __init__(self, in_channels: int = 1, classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, width)
        self.body1 = conv_bn_relu(width, 2 * width)
        self.body2 = conv_bn_relu(2 * width, 2 * width, stride=2)
        self.head = Head(2 * width, classes)
        init_weights(self)

    def stages(self):
        return [self.stem, self.body1, self.body2, self.head]


# ---- ResNet-18 (ImageNet-style) ---------------------------------------------------------------


class ResNet18(StagedModel):
    def __init__(self, in_channels: int = 3, classes: int = 1000):
        super().__init__()
        # max-pooling commutes with the ReLU, which runs in the first block (see BasicBlock)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
                                  nn.BatchNorm2d(64), nn.MaxPool2d(3, 2, 1))
        blocks, c_in = [], 64
        for i, c_out in enumerate((64, 128, 256, 512)):
            for j in range(2):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride, shortcut="B"))
                c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = Head(512, classes, relu=True)
        init_weights(self)

    def stages(self):
        return [self.stem, *self.blocks, self.head]


# ---- MobileNetV2 ------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = []
        if expand != 1:
            layers.append(conv_bn_relu(c_in, hidden, 1, relu=nn.ReLU6))
        layers += [conv_bn_relu(hidden, hidden, 3, stride, groups=hidden, relu=nn.ReLU6),
                   conv_bn_relu(hidden, c_out, 1, relu=None)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(StagedModel):
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]  # (expand, channels, repeats, first stride)

    def __init__(self, in_channels: int = 3, classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, 32, 3, 2, relu=nn.ReLU6)
        blocks, c_in = [], 32
        for expand, c_out, repeats, stride in self.SETTINGS:
            for j in range(repeats):
                blocks.append(InvertedResidual(c_in, c_out, stride if j == 0 else 1, expand))
                c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.last = conv_bn_relu(c_in, 1280, 1, relu=nn.ReLU6)
        self.head = Head(1280, classes, dropout)
        init_weights(self)

    def stages(self):
        return [self.stem, *self.blocks, self.last, self.head]


def init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


MODELS = {"resnet20": ResNet20, "smallcnn": SmallCNN, "resnet18": ResNet18,
          "mobilenetv2": MobileNetV2}


def build_model(name: str, in_channels: int = 1, classes: int = 10) -> StagedModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](in_channels=in_channels, classes=classes)
