"""DF-MPC's pairing: only chains whose channel scale can move safely from one conv to the next."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rfq.methods.dfmpc import FOLD_BN, FOLD_NEXT, PairingError, check_pairs, find_pairs
from rfq.models import build_model


def names(pairs):
    return [(p.low, p.high) for p in pairs]


def test_resnet20_pairs_each_block_inside_itself():
    pairs = find_pairs(build_model("resnet20"))
    assert names(pairs) == [(f"blocks.{i}.conv1", f"blocks.{i}.conv2") for i in range(9)]
    assert all(p.bn == p.low.replace("conv1", "bn1") and p.fold == FOLD_BN for p in pairs)


def test_resnet18_leaves_the_stem_and_shortcuts_unpaired():
    pairs = find_pairs(build_model("resnet18"))
    assert names(pairs) == [(f"blocks.{i}.conv1", f"blocks.{i}.conv2") for i in range(8)]


def test_mobilenetv2_never_pairs_into_a_residual_input():
    model = build_model("mobilenetv2")
    pairs = find_pairs(model)
    residual_inputs = {f"blocks.{i}.conv.0.0" for i, b in enumerate(model.blocks) if b.residual}
    assert pairs and not {p.high for p in pairs} & residual_inputs
    # ReLU6 between: c goes into the next conv; no activation (a projection): into the BN
    folds = {(p.low, p.fold) for p in pairs}
    assert ("stem.0", FOLD_NEXT) in folds
    assert ("blocks.0.conv.1.0", FOLD_BN) in folds  # blocks.0's projection -> blocks.1's expand
    lows = [p.low for p in pairs]
    assert len(set(lows) | {p.high for p in pairs}) == 2 * len(pairs)  # no layer twice


class Chain(nn.Module):
    """conv1 -> BN -> ReLU -> (variant) -> conv2 (-> conv3)."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4, affine=variant != "bn-not-affine")
        self.conv2 = nn.Conv2d(8 if variant == "concat" else 4, 4, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn_late = nn.BatchNorm2d(4)

    def forward(self, x):
        v = self.variant
        y = self.conv1(x)
        if v == "bn-after-relu":
            y = self.bn_late(F.relu(y))
        else:
            y = F.relu(self.bn1(y))
        if v == "two-consumers":
            return self.conv2(y) + self.conv3(y)
        if v == "residual":
            y = y + self.conv3(x[:, :1].expand(-1, 4, -1, -1))
        if v == "concat":
            y = torch.cat([y, y], 1)
        if v == "zero-pad":
            y = F.pad(y, (1, 1, 1, 1))
        if v == "one-pad":
            y = F.pad(y, (1, 1, 1, 1), value=1.0)
        if v == "avg-pool":
            y = F.avg_pool2d(y, 2)
        return self.conv3(self.conv2(y))


@pytest.mark.parametrize("variant, paired", [
    ("plain", True), ("zero-pad", True), ("avg-pool", True),
    ("two-consumers", False), ("residual", False), ("concat", False), ("one-pad", False),
    ("bn-after-relu", False), ("bn-not-affine", False),
])
def test_only_safe_chains_pair(variant, paired):
    pairs = find_pairs(Chain(variant))
    assert (("conv1", "conv2") in names(pairs)) == paired


def test_explicit_pairs_are_checked():
    model = Chain("plain")
    (pair,) = check_pairs(model, [("conv1", "conv2")])
    assert pair.bn == "bn1" and pair.fold == FOLD_BN
    with pytest.raises(PairingError, match=r"\('conv1', 'conv3'\) is not a safe pair"):
        check_pairs(model, [("conv1", "conv3")])
    with pytest.raises(PairingError, match=r"'conv9' is not a Conv2d of this model"):
        check_pairs(model, [("conv1", "conv9")])
    with pytest.raises(PairingError, match=r"'conv2' is in two pairs"):
        check_pairs(model, [("conv1", "conv2"), ("conv2", "conv3")])
    with pytest.raises(PairingError, match=r"each pair must be \(low_conv_name, high_conv_name\)"):
        check_pairs(model, ["conv1"])
    with pytest.raises(PairingError, match="not a safe pair"):
        check_pairs(Chain("two-consumers"), [("conv1", "conv2")])


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = -x
        return self.conv2(self.conv1(x))


def test_untraceable_model_is_a_clear_error():
    with pytest.raises(PairingError, match="could not trace Untraceable with torch.fx"):
        find_pairs(Untraceable())
