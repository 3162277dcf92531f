"""Datasets without downloads: Fashion-MNIST / MNIST IDX files (Debian's dataset-fashion-mnist)
and scikit-learn's digits, held as uint8 tensors; deterministic batch streams with augmentation.

Every batch is a pure function of (seed, epoch, batch index): the order is a seeded permutation
per epoch and the augmentation of batch i draws from its own generator, so a resumed run sees
exactly the batches the interrupted one would have (spec: resume is bit-identical).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = ("install it with:  sudo apt-get update && sudo apt-get install -y "
                "dataset-fashion-mnist   (or pass --data-dir to a folder with the IDX .gz files)")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


@dataclass
class Split:
    images: Tensor  # uint8 [N, C, H, W]
    labels: Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    train: Split
    holdout: Split  # search scoring and BN calibration (never the test set)
    test: Split
    mean: float
    std: float
    classes: int = 10
    pad: int = 2  # random-crop padding; 0 turns augmentation's crop off
    flip: bool = True

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[2:])


def read_idx(path: Path, magic: int) -> Tensor:
    """One IDX file (gzip or raw): checks the magic number and the item count."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = magic & 0xFF
    if len(data) < 4 + 4 * dims:
        raise ValueError(f"{path}: truncated IDX header")
    found, = struct.unpack(">I", data[:4])
    if found != magic:
        raise ValueError(f"{path}: IDX magic {found:#010x}, expected {magic:#010x}")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    body = data[4 + 4 * dims:]
    count = 1
    for s in shape:
        count *= s
    if len(body) != count:
        raise ValueError(f"{path}: {len(body)} bytes of data, header promises {count}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {folder}; "
                            + INSTALL_HINT)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, holdout: int = 5000,
                       seed: int = 0) -> Dataset:
    """Fashion-MNIST: 55k train / 5k held out (search, BN calibration) / 10k test."""
    folder = Path(data_dir or os.environ.get("RFQ_DATA_DIR", DEFAULT_FASHION_DIR))
    if not folder.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {folder} does not exist; " + INSTALL_HINT)
    images = read_idx(_find(folder, "train-images-idx3-ubyte"), 0x00000803)
    labels = read_idx(_find(folder, "train-labels-idx1-ubyte"), 0x00000801).long()
    test_x = read_idx(_find(folder, "t10k-images-idx3-ubyte"), 0x00000803)
    test_y = read_idx(_find(folder, "t10k-labels-idx1-ubyte"), 0x00000801).long()
    if len(images) != len(labels) or len(test_x) != len(test_y):
        raise ValueError(f"{folder}: image and label counts differ")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    hold, train = perm[:holdout], perm[holdout:]
    return Dataset("fashion-mnist", Split(images[train, None], labels[train]),
                   Split(images[hold, None], labels[hold]), Split(test_x[:, None], test_y),
                   FASHION_MEAN, FASHION_STD)


def load_digits_dataset(seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 digits (8x8, values 0..16 scaled to 0..255): 1,200 train / 300 held
    out / 297 test. For tests: no crop padding (the images are tiny), no flips (digits)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images * (255.0 / 16.0)).round().to(torch.uint8)[:, None]
    labels = torch.tensor(raw.target).long()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[perm], labels[perm]
    mean = images.float().mean().item() / 255.0
    std = images.float().std().item() / 255.0
    return Dataset("digits", Split(images[:1200], labels[:1200]),
                   Split(images[1200:1500], labels[1200:1500]),
                   Split(images[1500:], labels[1500:]), mean, std, pad=0, flip=False)


def load_dataset(name: str, data_dir=None, seed: int = 0) -> Dataset:
    if name in ("fashion-mnist", "fmnist"):
        return load_fashion_mnist(data_dir, seed=seed)
    if name == "digits":
        return load_digits_dataset(seed)
    raise ValueError(f"unknown dataset {name!r}; choose fashion-mnist or digits")


def normalize(images: Tensor, mean: float, std: float) -> Tensor:
    return (images.float() * (1.0 / 255.0) - mean) / std


def augment(images: Tensor, pad: int, flip: bool, gen: torch.Generator) -> Tensor:
    """Random crop (zero padding `pad`) and horizontal flip, per image, on a uint8 batch."""
    n, _, h, w = images.shape
    if n == 0:
        return images
    if pad:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, images.shape[1], h,
                                                                         w + 2 * pad)
        images = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, images.shape[1], h, w)
        images = images.gather(3, cols)
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    return images


def mix_seed(*values: int) -> int:
    """A stable 63-bit seed from integers (splitmix64 steps; Python's hash() is salted per
    process, so it cannot seed anything that must survive a restart)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class BatchStream:
    """Deterministic training batches: ``batch(epoch, i)`` is the i-th batch of that epoch.

    With ``world > 1`` every rank draws the same global batch and keeps its ``rank``-th slice,
    so all ranks see the same order (and draw the same random bit-width configurations).
    """

    def __init__(self, split: Split, dataset: Dataset, batch_size: int, seed: int = 0,
                 augment_data: bool = True, limit: int | None = None, rank: int = 0,
                 world: int = 1, device="cpu", channels_last: bool = False):
        if batch_size < world:
            raise ValueError(f"batch_size {batch_size} must be at least the world size {world}")
        self.split, self.ds, self.batch_size, self.seed = split, dataset, batch_size, seed
        self.augment, self.rank, self.world, self.device = augment_data, rank, world, device
        self.channels_last = channels_last
        self.size = min(len(split), limit) if limit else len(split)
        self.steps_per_epoch = self.size // batch_size  # drop the ragged last batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.size} training images are fewer than one batch of "
                             f"{batch_size}")

    def _perm(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0))
        return torch.randperm(self.size, generator=g)

    def batch(self, epoch: int, i: int) -> tuple[Tensor, Tensor]:
        if not 0 <= i < self.steps_per_epoch:
            raise IndexError(f"batch {i} outside 0..{self.steps_per_epoch - 1}")
        idx = self._perm(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        idx = idx[self.rank::self.world]
        images = self.split.images[idx]
        if self.augment:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1, i))
            images = augment(images, self.ds.pad, self.ds.flip, g)
        x = normalize(images, self.ds.mean, self.ds.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.device, non_blocking=True), self.split.labels[idx].to(self.device)


def eval_batches(split: Split, dataset: Dataset, batch_size: int = 256, device="cpu",
                 channels_last: bool = False, limit: int | None = None):
    """Un-augmented batches of a split in order."""
    n = min(len(split), limit) if limit else len(split)
    for start in range(0, n, batch_size):
        x = normalize(split.images[start:min(n, start + batch_size)], dataset.mean, dataset.std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x.to(device), split.labels[start:min(n, start + batch_size)].to(device)
