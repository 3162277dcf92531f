"""Stage 1: one-shot weight-coupled training (spec method_rfq.md §2-4), plus the two trainings it
is compared with: float pretraining (stage 0) and a single-bit-width LSQ model.

One coupled step on a batch (x, y):
1. max pass: every mixed layer at its highest bits, loss CE, backward; its logits z* and every
   switchable BN's output are kept (detached) as the teacher;
2. N random passes: each mixed layer draws (w, a) uniformly from its current candidate sets
   (the scheduler may have frozen its lowest bit), loss 1/2 CE + 1/2 KL(z* || z) + 0.01 IDM
   (+ optional QE and AR terms), backward; gradients add up over the passes;
3. every gradient element clipped to [-1, 1]; SGD (weights, BN copies, FC), Adam (step sizes);
   entries of stacked tensors no pass used keep their values and optimizer moments; steps are
   clamped positive; then the EMA model (the one searched and evaluated) is updated.
Configurations are drawn on the host from a seeded generator shared by all ranks; nothing in the
step reads a device value except the logging at intervals.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from rfq import checkpoint as ckpt
from rfq import ops
from rfq.data import BatchStream, Dataset, eval_batches, load_dataset, mix_seed
from rfq.models import build_model
from rfq.nn import (QuantConfig, SwitchableBatchNorm2d, mixed_layers, quant_layers, quantize_,
                    set_bits)
from rfq.nn.modules import QuantLayer
from rfq.reference import qrange
from rfq.scheduler import BitWidthScheduler

MODES = ("coupled", "float", "lsq")


@dataclass
class TrainConfig:
    mode: str = "coupled"  # coupled | float | lsq (one bit-width trained alone)
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    seed: int = 0
    bits: list = field(default_factory=lambda: [6, 5, 4, 3, 2])
    act_bits: Optional[list] = None  # None: shared W/A candidate sets
    depthwise_bits: list = field(default_factory=lambda: [6, 5, 4, 3])
    lsq_bits: int = 4  # mode "lsq": the one bit-width (W and A)
    epochs: int = 40
    steps_per_epoch: Optional[int] = None  # None: one pass over the training images
    train_limit: Optional[int] = None  # use only the first N training images (quick runs)
    batch_size: int = 128
    lr: float = 0.01
    warmup_epochs: float = 2.0
    min_lr: float = 1e-5
    momentum: float = 0.9
    weight_decay: float = 2.5e-5
    step_lr: float = 1e-4  # Adam, step sizes
    n_random: int = 3
    kd: bool = True  # random passes: 1/2 CE + 1/2 KL to the max pass (else CE)
    label_smoothing: float = 0.0
    idm: bool = True
    idm_weight: float = 0.01
    qe: bool = False
    qe_start: Optional[int] = None  # default floor(0.27 E)
    qe_max: float = 0.1
    ar: bool = False
    ar_weight: float = 2.5e-5
    scheduler: bool = True
    freeze_start: int = 2
    p_early: int = 2
    p_late: Optional[int] = None  # default ceil(E / 10)
    ratio_max: float = 0.5
    ratio_min: float = 0.2
    ema_decay: float = 0.998
    ema_warmup: bool = True
    grad_clip: float = 1.0
    masked_update: bool = True  # False: RFQuant's drift of unused entries (legacy)
    lsq_grad_scale: bool = False
    channels_last: bool = True
    init_from: Optional[str] = None  # float checkpoint to start from
    log_every: int = 20
    tensorboard: bool = False  # also write the logged scalars to run_dir/tensorboard
    checkpoint_every: int = 200
    device: str = "cpu"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("epochs", "batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_random < 0:
            raise ValueError(f"n_random must be >= 0, got {self.n_random}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if not self.lr > 0 or not self.step_lr >= 0:
            raise ValueError("lr must be > 0 and step_lr >= 0")
        if not 1 <= self.lsq_bits <= 8:
            raise ValueError(f"lsq_bits must be in 1..8, got {self.lsq_bits}")
        self.quant_config()  # validates the bit sets

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        return cls(**values)

    def quant_config(self) -> QuantConfig:
        if self.mode == "lsq":
            b = (self.lsq_bits,)
            return QuantConfig(bits=b, act_bits=b, depthwise_bits=b,
                               lsq_grad_scale=self.lsq_grad_scale)
        return QuantConfig(bits=tuple(self.bits),
                           act_bits=tuple(self.act_bits) if self.act_bits else None,
                           depthwise_bits=tuple(self.depthwise_bits),
                           lsq_grad_scale=self.lsq_grad_scale)

    # settings that shape the model and the data: a checkpoint must agree on them
    SHAPE_KEYS = ("mode", "model", "dataset", "bits", "act_bits", "depthwise_bits", "lsq_bits",
                  "seed", "batch_size", "train_limit")


# ---- distributed -------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# ---- helpers shared with search/eval -------------------------------------------------------------


def load_model(cfg: TrainConfig, dataset: Dataset, device="cpu") -> nn.Module:
    """The model of a run: built, loaded from ``init_from`` (float weights), quantized."""
    model = build_model(cfg.model, dataset.in_channels, dataset.classes)
    if cfg.init_from:
        state = ckpt.load(cfg.init_from, kind="float")
        if state["config"]["model"] != cfg.model:
            raise ckpt.CheckpointError(f"init_from {cfg.init_from} holds a "
                                       f"{state['config']['model']}, this run trains a "
                                       f"{cfg.model}")
        model.load_state_dict(state["model"])
    if cfg.mode != "float":
        quantize_(model, cfg.quant_config())
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


@contextlib.contextmanager
def flush_denormals():
    """Flush denormals to zero while training/evaluating (torch's default is off, and it has
    no getter): tiny activations and gradients otherwise run through slow microcode paths,
    up to 30x slower on these CPUs. The kernels' exactness tests run without it."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@functools.cache
def retain_freed_memory() -> bool:
    """On glibc, keep freed tensor memory in the process instead of returning it to the OS.

    glibc's defaults (an mmap threshold that adapts, a 128 KB trim threshold) hand each step's
    freed activations back to the kernel, so the next step faults its pages in again: a coupled
    ResNet-20 step (batch 128) took ~56,000 minor faults and ran ~100 ms (25 %) slower than with
    the memory kept; the float model took ~9,000. Fixed thresholds (mmap above 32 MB, trim above
    1 GB) bring that to ~0. Process-wide and idempotent; ``RFQ_KEEP_FREED_MEMORY=0`` opts out.
    Returns whether the thresholds were set."""
    if os.environ.get("RFQ_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): leave the allocator alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def step_layers(model: nn.Module) -> list[QuantLayer]:
    return [m for _, m in quant_layers(model)]


@torch.no_grad()
def initialize_activation_steps(model: nn.Module, x: torch.Tensor) -> None:
    """Set every layer's activation steps from one real batch, highest bit first, before the
    EMA copy is made (spec §6 quirk 9: the EMA must never see the placeholder steps)."""
    layers = mixed_layers(model)
    all_bits = sorted({b for _, m in layers for b in m.a_bits}, reverse=True)
    was_training = model.training
    model.eval()
    for b in all_bits:
        cfg = {}
        for name, m in layers:
            w = min(m.w_bits, key=lambda c: abs(c - b))
            a = min(m.a_bits, key=lambda c: abs(c - b)) if m.a_bits else None
            cfg[name] = (w, a)
        set_bits(model, cfg)
        model(x)
    set_bits(model, "max")
    model(x)  # fixed layers (FC) too
    model.train(was_training)


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta over every float parameter and buffer, with the
    optional warm-up d_t = min(d, (1 + t) / (10 + t))."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self._pairs(model)

    def _pairs(self, model):
        live = dict(model.named_parameters()) | dict(model.named_buffers())
        mine = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        persistent = set(model.state_dict())
        self.float_pairs, self.other_pairs = ([], []), []
        for name, t in mine.items():
            if name not in persistent:
                continue
            if t.is_floating_point():
                self.float_pairs[0].append(t)
                self.float_pairs[1].append(live[name])
            else:
                self.other_pairs.append((t, live[name]))

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay
        if self.warmup:
            d = min(d, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        torch._foreach_lerp_(self.float_pairs[0], [t.detach() for t in self.float_pairs[1]],
                             1.0 - d)
        for mine, live in self.other_pairs:
            mine.copy_(live)

    def state_dict(self):
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


class MaskedUpdate:
    """Stacked tensors (BN copies, per-bit steps) whose entries no pass of the step used keep
    their values and optimizer moments (spec §6 quirk 7). Usage marks are set on device by the
    layers' forwards; the restore is a torch.where per tensor: no host sync."""

    def __init__(self, model: nn.Module, optimizers):
        self.entries = []  # (param, layer or BN, attribute of the usage mask)
        for m in model.modules():
            if isinstance(m, QuantLayer):
                if len(m.w_bits) > 1:
                    self.entries.append((m.w_steps, m, "w_used"))
                if len(m.a_bits) > 1:
                    self.entries.append((m.a_steps, m, "a_used"))
            elif isinstance(m, SwitchableBatchNorm2d) and m.used.numel() > 1:
                self.entries += [(m.weight, m, "used"), (m.bias, m, "used")]
        self.optimizers = optimizers
        self._saved = []

    def _state(self, p):
        for opt in self.optimizers:
            if p in opt.state:
                return {k: v for k, v in opt.state[p].items()
                        if torch.is_tensor(v) and v.shape == p.shape}
        return {}

    def snapshot(self) -> None:
        self._saved = []
        for p, owner, attr in self.entries:
            if p.grad is None:
                continue
            state = self._state(p)
            self._saved.append((p, owner, attr, p.detach().clone(),
                                {k: v.clone() for k, v in state.items()}))

    @torch.no_grad()
    def restore(self) -> None:
        for p, owner, attr, old, old_state in self._saved:
            mask = getattr(owner, attr)
            if mask.dim() < p.dim():
                mask = mask.reshape(*mask.shape, *([1] * (p.dim() - mask.dim())))
            p.copy_(torch.where(mask, p, old))
            state = self._state(p)
            for k, v in old_state.items():
                state[k].copy_(torch.where(mask, state[k], v))
        self._saved = []


class FeatureMSE(torch.autograd.Function):
    """mean((student - teacher)^2) with the teacher detached, in three memory passes (difference,
    norm; one multiply back) instead of F.mse_loss's six. Its gradient keeps the features' memory
    format: F.mse_loss's comes back NCHW-contiguous for channels_last features, and batch-norm
    backward with a channels_last input and an NCHW gradient runs ~4.5x slower (measured 6.0 vs
    1.3 ms at 128x16x28x28)."""

    @staticmethod
    def forward(ctx, student, teacher):
        diff = student - teacher
        ctx.save_for_backward(diff)
        return torch.linalg.vector_norm(diff).square() / max(diff.numel(), 1)

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        return diff * (grad * (2.0 / max(diff.numel(), 1))), None


class FeatureTap:
    """Forward hooks on every switchable BN (IDM): in 'teacher' mode they keep detached outputs
    of the selected layers; in 'student' mode the outputs of the selected layers, with their
    graph."""

    def __init__(self, model: nn.Module):
        self.mode, self.selected, self.teacher, self.student = None, set(), {}, {}
        self.handles = []
        for name, layer in mixed_layers(model):
            if layer._bn_ref:
                self.handles.append(layer._bn_ref[0].register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(mod, inputs, output):
            if self.mode == "teacher":
                if name in self.selected:  # only what a later pass compares against
                    self.teacher[name] = output.detach()
            elif self.mode == "student" and name in self.selected:
                self.student[name] = output
        return hook

    def loss(self) -> torch.Tensor | None:
        terms = [FeatureMSE.apply(out, self.teacher[n]) for n, out in self.student.items()]
        self.student = {}
        return torch.stack(terms).sum() if terms else None

    def close(self):
        for h in self.handles:
            h.remove()


def qe_loss(layer: QuantLayer, min_bit: int) -> torch.Tensor:
    """Oscillation-dampening pull of the weights towards codes that also lie on the coarsest
    grid (spec §2 "QE"); gradient to the weight only."""
    b, j = layer.w_bit, layer.w_index
    s = layer.w_steps.detach()[j]
    qn, qp = qrange(b, True)
    w_hat = torch.clamp(layer.weight, s * qn, s * qp)
    codes = ops.quantize_codes(layer.weight.detach(), s.reshape(1), b, True).float()
    d = b - min_bit
    target = s * codes
    if d > 0:
        target = torch.where(torch.remainder(codes, 2 ** d) == 0, target, w_hat.detach())
    sq = (w_hat - target).square()
    return sq.sum(0).mean()


def ar_loss(layer: QuantLayer) -> torch.Tensor:
    """Adaptive-region weight decay term 1/2 ||clip(W, -2 s_2, s_2)||^2 (spec §2 "AR")."""
    s2 = layer.w_steps.detach()[layer.w_bits.index(2)]
    return 0.5 * torch.clamp(layer.weight, -2 * s2, s2).square().sum()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == labels).float().mean()


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> float:
    """Top-1 accuracy over batches in eval mode (one host read at the end)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    total = 0
    for x, y in batches:
        correct = correct + (model(x).argmax(1) == y).sum().cpu()
        total += len(y)
    model.train(was_training)
    return correct.item() / max(total, 1)


# ---- the trainer ----------------------------------------------------------------------------------


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("tensorboard=True needs the tensorboard package "
                         "(pip install tensorboard); the CSV log needs nothing") from None
    return SummaryWriter


class Trainer:
    """Trains one run into ``run_dir`` (checkpoint.pt, log.csv, config.json); resumable."""

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, resume: bool = False,
                 dataset: Dataset | None = None, progress: bool = True):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.dist = setup_distributed(cfg.device)
        self.device = torch.device(cfg.device if not cfg.device.startswith("cuda")
                                   else f"cuda:{self.dist.local_rank}")
        self.progress = progress and self.dist.main
        retain_freed_memory()
        if cfg.tensorboard and self.dist.main:
            _summary_writer_class()  # a missing package fails here, before any work
        self._tb = None
        self.ds = dataset or load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
        saved = None
        if self.ckpt_path.exists():
            if not resume:
                raise ckpt.CheckpointError(
                    f"{self.ckpt_path} already exists: pass --resume to continue that run or "
                    f"choose another output folder (it is never overwritten by a new run)")
            saved = ckpt.load(self.ckpt_path, kind=cfg.mode)
            ckpt.check_compatible(saved["config"], asdict(cfg), TrainConfig.SHAPE_KEYS,
                                  self.ckpt_path)
        torch.manual_seed(cfg.seed)  # model init (and dropout) reproducible
        self.model = load_model(cfg, self.ds, self.device)
        self.net = self.model
        if self.dist.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None)
        self.stream = BatchStream(self.ds.train, self.ds, cfg.batch_size, cfg.seed,
                                  limit=cfg.train_limit, rank=self.dist.rank,
                                  world=self.dist.world, device=self.device,
                                  channels_last=cfg.channels_last)
        self.steps_per_epoch = cfg.steps_per_epoch or self.stream.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self._build_optimizers()
        self.scheduler = None
        if cfg.mode == "coupled" and cfg.scheduler:
            self.scheduler = BitWidthScheduler(
                self.model, cfg.epochs, cfg.freeze_start, cfg.p_early,
                cfg.p_late or math.ceil(cfg.epochs / 10), ratio_max=cfg.ratio_max,
                ratio_min=cfg.ratio_min, shared_sets=cfg.quant_config().shared_sets)
        self.sampler = random.Random()
        self.step, self.ema = 0, None
        self.tap = FeatureTap(self.model) if cfg.mode == "coupled" and cfg.idm else None
        self.masked = MaskedUpdate(self.model, self.optimizers) \
            if cfg.mode == "coupled" and cfg.masked_update else None
        self.wall = 0.0  # training seconds so far (over resumes)
        if saved is not None:
            self._restore(saved)
        else:
            if cfg.mode != "float":
                initialize_activation_steps(self.model, self.stream.batch(0, 0)[0])
                self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup)
            self.sampler.seed(mix_seed(cfg.seed, 0, 7))

    # -- optimizers and schedules --
    def _build_optimizers(self):
        cfg = self.cfg
        decay, no_decay, steps = [], [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith(("w_steps", "a_steps")):
                steps.append(p)
            elif p.dim() == 4:  # conv weights (stem included)
                decay.append(p)
            else:  # BN copies, FC, biases
                no_decay.append(p)
        wd = cfg.weight_decay
        self.sgd = torch.optim.SGD([{"params": decay, "weight_decay": wd},
                                    {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                   momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        self.optimizers = [self.sgd]
        self.adam = None
        if steps:
            self.adam = torch.optim.Adam(steps, lr=cfg.step_lr)
            self.optimizers.append(self.adam)

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def lr_at(self, step: int) -> tuple[float, float]:
        """(SGD lr, Adam lr) at a step: linear warm-up from min_lr, cosine over the epochs
        (per step, fractional epochs; the warm-up is not prefixed to the cosine)."""
        cfg, e = self.cfg, self.epoch_of(step)

        def cosine(epoch):
            return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * epoch
                                                                           / cfg.epochs))
        if e < cfg.warmup_epochs:
            lr = cfg.min_lr + (cosine(cfg.warmup_epochs) - cfg.min_lr) * e / cfg.warmup_epochs
        else:
            lr = cosine(e)
        return lr, cfg.step_lr * 0.5 * (1 + math.cos(math.pi * e / cfg.epochs))

    def qe_weight(self, step: int) -> float:
        cfg = self.cfg
        if not cfg.qe:
            return 0.0
        start = (cfg.qe_start if cfg.qe_start is not None else math.floor(0.27 * cfg.epochs))
        t0, span = start * self.steps_per_epoch, (cfg.epochs - start) * self.steps_per_epoch
        if step < t0 or span <= 0:
            return 0.0
        return cfg.qe_max - 0.5 * cfg.qe_max * (1 + math.cos(math.pi * (step - t0) / span))

    # -- configurations --
    def sample_config(self) -> dict:
        cfg = {}
        for name, layer in mixed_layers(self.model):
            w_set = self.scheduler.w_sets[name] if self.scheduler else layer.w_bits
            a_set = self.scheduler.a_sets[name] if self.scheduler else layer.a_bits
            w = self.sampler.choice(w_set)
            a = self.sampler.choice(a_set) if a_set else None
            cfg[name] = (w, a)
        return cfg

    def min_weight_bit(self, name: str, layer: QuantLayer) -> int:
        return min(self.scheduler.w_sets[name]) if self.scheduler else min(layer.w_bits)

    # -- one step --
    def _ce(self, logits, y, scale=1.0):
        return scale * F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        cfg, model = self.cfg, self.model
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        for m in model.modules():
            if isinstance(m, (QuantLayer, SwitchableBatchNorm2d)):
                m.clear_usage()
        lr, step_lr = self.lr_at(self.step)
        for group in self.sgd.param_groups:
            group["lr"] = lr
        if self.adam:
            for group in self.adam.param_groups:
                group["lr"] = step_lr
        if cfg.mode == "coupled":
            logs = self._coupled_passes(x, y)
        else:
            logits = self.net(x)
            loss = self._ce(logits, y)
            loss.backward()
            logs = {"loss": loss.detach(), "acc": accuracy(logits.detach(), y)}
        params = [p for p in model.parameters() if p.grad is not None]
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
        if self.masked:
            self.masked.snapshot()
        for opt in self.optimizers:
            opt.step()
        if self.masked:
            self.masked.restore()
        for layer in step_layers(model):
            layer.clamp_steps_()
        if self.ema:
            self.ema.update()
        self.step += 1
        return logs

    def _idm_layers(self, config, layers) -> set:
        """IDM's layers of one random config: those drawn at their lowest weight bit."""
        return {n for n, m in layers if config[n][0] == self.min_weight_bit(n, m)}

    def _coupled_passes(self, x, y) -> dict:
        cfg, model = self.cfg, self.model
        passes = 1 + cfg.n_random
        sync = self.net.no_sync if isinstance(self.net, nn.parallel.DistributedDataParallel) \
            else contextlib.nullcontext
        set_bits(model, "max")
        # the random configs are drawn first (same host draws, same order) so that the max pass
        # keeps only the teacher features some later pass compares against
        configs = [self.sample_config() for _ in range(cfg.n_random)]
        layers = mixed_layers(model)
        if self.tap:
            self.tap.mode = "teacher"
            self.tap.selected = set().union(*(self._idm_layers(c, layers) for c in configs))
        with sync() if passes > 1 else contextlib.nullcontext():
            z0 = self.net(x)
            loss0 = self._ce(z0, y)
            loss0.backward()
        teacher = z0.detach()
        p_teacher = F.softmax(teacher.float(), 1)
        logs = {"loss_max": loss0.detach(), "acc_max": accuracy(teacher, y)}
        random_loss = torch.zeros((), device=x.device)
        qe_w = self.qe_weight(self.step)
        ar_layers = {}
        for k, config in enumerate(configs):
            set_bits(model, config)
            if self.tap:
                self.tap.mode = "student"
                self.tap.selected = self._idm_layers(config, layers)
            last = k == cfg.n_random - 1
            with contextlib.nullcontext() if last else sync():
                z = self.net(x)
                if cfg.kd:
                    loss = self._ce(z, y, 0.5) + 0.5 * F.kl_div(
                        F.log_softmax(z.float(), 1), p_teacher, reduction="batchmean")
                else:
                    loss = self._ce(z, y)
                if self.tap:
                    idm = self.tap.loss()
                    if idm is not None:
                        loss = loss + cfg.idm_weight * idm
                if qe_w > 0:
                    loss = loss + qe_w * sum(qe_loss(m, self.min_weight_bit(n, m))
                                             for n, m in layers)
                if cfg.ar:
                    ar_layers.update({n: m for n, m in layers
                                      if config[n][0] == 2 and 2 in m.w_bits})
                    if last and ar_layers:  # once per step per layer drawn at W2 (quirk 8)
                        loss = loss - cfg.ar_weight * sum(ar_loss(m) for m in ar_layers.values())
                loss.backward()
            random_loss = random_loss + loss.detach()
        if self.tap:
            self.tap.mode, self.tap.teacher, self.tap.selected = None, {}, set()
        set_bits(model, "max")
        if cfg.n_random:
            logs["loss_random"] = random_loss / cfg.n_random
        return logs

    # -- loop --
    def run(self, max_steps: int | None = None) -> dict:
        """Train until the last epoch (or ``max_steps`` more steps); checkpoints atomically."""
        cfg = self.cfg
        end = self.total_steps if max_steps is None else min(self.total_steps,
                                                             self.step + max_steps)
        log_file = None
        writer = None
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
            new = not (self.run_dir / "log.csv").exists() or self.step == 0
            log_file = open(self.run_dir / "log.csv", "w" if new else "a", newline="")
            writer = csv.writer(log_file)
            if new:
                writer.writerow(["step", "epoch", "lr", "loss_max", "loss_random", "acc_max",
                                 "images_per_s", "frozen_layers", "wall_s"])
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.step, desc=f"train {cfg.mode}", unit="step",
                       dynamic_ncols=True, mininterval=1.0)
        self._log_file = log_file
        self._tb = (_summary_writer_class()(str(self.run_dir / "tensorboard"))
                    if self.dist.main and cfg.tensorboard else None)
        try:
            with flush_denormals():
                return self._loop(end, writer, bar, log_file)
        finally:
            if self._tb:
                self._tb.close()
            self._tb = None

    def _loop(self, end, writer, bar, log_file) -> dict:
        cfg = self.cfg
        pending, t_log, n_log = [], time.perf_counter(), 0
        last_logs = {}
        try:
            while self.step < end:
                epoch, i = divmod(self.step, self.steps_per_epoch)
                if i == 0:
                    self.sampler.seed(mix_seed(cfg.seed, epoch, 7))  # same draws on all ranks
                    if self.scheduler:
                        frozen = self.scheduler.step(self.model, epoch)
                        if frozen and self.progress:
                            bar.write(f"epoch {epoch}: scheduler froze the lowest bit of "
                                      f"{len(frozen)} layers")
                data_epoch, data_i = divmod(self.step, self.stream.steps_per_epoch)
                x, y = self.stream.batch(data_epoch, data_i)
                t0 = time.perf_counter()
                logs = self.train_step(x, y)
                pending.append(logs)
                n_log += len(y) * self.dist.world
                self.wall += time.perf_counter() - t0
                if bar:
                    bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == end:
                    last_logs = self._flush_logs(pending, writer, bar, n_log,
                                                 time.perf_counter() - t_log)
                    pending, t_log, n_log = [], time.perf_counter(), 0
                if self.step % cfg.checkpoint_every == 0 or self.step == end:
                    self.save()
        finally:
            if bar:
                bar.close()
            if log_file:
                log_file.close()
        return last_logs

    def _flush_logs(self, pending, writer, bar, images, seconds) -> dict:
        keys = pending[-1].keys()
        means = {k: torch.stack([p[k].float() for p in pending if k in p]).mean().item()
                 for k in keys}  # the one host read per logging interval
        lr, _ = self.lr_at(self.step - 1)
        frozen = len(self.scheduler.frozen_layers()) if self.scheduler else 0
        images_per_s = images / max(seconds, 1e-9)
        if writer:
            writer.writerow([self.step, f"{self.epoch_of(self.step):.3f}", f"{lr:.6g}",
                             f"{means.get('loss_max', means.get('loss', float('nan'))):.5f}",
                             f"{means.get('loss_random', float('nan')):.5f}",
                             f"{means.get('acc_max', means.get('acc', float('nan'))):.4f}",
                             f"{images_per_s:.1f}", frozen, f"{self.wall:.1f}"])
            self._log_file.flush()
        if self._tb:
            for k, v in means.items():
                self._tb.add_scalar(f"train/{k}", v, self.step)
            self._tb.add_scalar("train/lr", lr, self.step)
            self._tb.add_scalar("train/images_per_s", images_per_s, self.step)
            self._tb.add_scalar("train/frozen_layers", frozen, self.step)
        if bar:
            bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()}, refresh=False)
        return means

    # -- checkpoints --
    def state(self) -> dict:
        rng = {"sampler": self.sampler.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "kind": self.cfg.mode, "config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "rng": rng, "step": self.step, "wall": self.wall,
            "total_steps": self.total_steps,
        }

    def save(self) -> None:
        if self.dist.world > 1:
            torch.distributed.barrier()
        if self.dist.main:
            ckpt.save_atomic(self.state(), self.ckpt_path)

    def _restore(self, saved: dict) -> None:
        try:
            self.model.load_state_dict(saved["model"])
            for opt, state in zip(self.optimizers, saved["optimizers"]):
                opt.load_state_dict(state)
            if saved["ema"] is not None:
                self.ema = EMA(self.model, self.cfg.ema_decay, self.cfg.ema_warmup)
                self.ema.load_state_dict(saved["ema"])
            if self.scheduler and saved["scheduler"]:
                self.scheduler.load_state_dict(saved["scheduler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ckpt.CheckpointError(f"checkpoint {self.ckpt_path} does not match this "
                                       f"model: {str(err)[:300]}") from None
        state = saved["rng"]["sampler"]
        self.sampler.setstate((state[0], tuple(state[1]), state[2]))
        torch.set_rng_state(saved["rng"]["torch"])
        if "cuda" in saved["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        self.step, self.wall = saved["step"], saved.get("wall", 0.0)

    def close(self):
        if self.tap:
            self.tap.close()


def eval_model(trainer_or_model) -> nn.Module:
    """The model a run is evaluated with: the EMA copy when there is one."""
    if isinstance(trainer_or_model, Trainer):
        return trainer_or_model.ema.model if trainer_or_model.ema else trainer_or_model.model
    return trainer_or_model


__all__ = ["TrainConfig", "Trainer", "EMA", "evaluate", "eval_batches", "load_model",
           "initialize_activation_steps"]
