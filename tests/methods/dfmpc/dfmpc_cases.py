"""Constructed models of the DF-MPC tests: one conv pair with trained-looking BN."""

import torch
from torch import nn


def randomize_bn(model, seed=0):
    """Trained-looking BN parameters and statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.3 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model.eval()


class PairNet(nn.Module):
    """conv -> [BN] -> act -> [pool] -> conv (groups) -> BN -> ReLU -> GAP -> FC."""

    def __init__(self, act=nn.ReLU, bn=True, groups=1, pool=False, bias=False, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=bias or not bn)
        self.bn1 = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.act = act()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.conv2 = nn.Conv2d(c, c if groups > 1 else 6, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(self.conv2.out_channels)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(self.conv2.out_channels, 4)

    def forward(self, x):
        x = self.pool(self.act(self.bn1(self.conv1(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def scaled_after_act(model, c):
    """The model with channel j after the pair's activation multiplied by c_j (a hook)."""
    model.act.register_forward_hook(lambda mod, inp, out: out * c.view(1, -1, 1, 1))
    return model
