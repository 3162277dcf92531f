"""The trainer every method shares: run folder, torchrun/DDP, data stream, optimizers and their
schedules, EMA, masked update, logging (CSV, tqdm, TensorBoard) and atomic, bit-identical resume.

A method subclasses ``Trainer`` and overrides the hooks: ``build_model`` (its quantized model),
``setup`` (its parts that need the model and the optimizers), ``fresh_start`` (state made before
the first step), ``passes`` (the forward/backward passes of one step), ``on_epoch_start``,
``frozen_count``, ``extra_state``/``load_extra_state`` (its part of the checkpoint).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rfq import checkpoint as ckpt
from rfq.data import BatchStream, Dataset, load_dataset, mix_seed
from rfq.models import build_model
from rfq.nn import QuantLayer, SwitchableBatchNorm2d, quant_layers
from rfq.runtime import flush_denormals, retain_freed_memory, setup_distributed
from rfq.training.config import TrainSettings
from rfq.training.ema import EMA
from rfq.training.entry_adam import EntrywiseAdam
from rfq.training.metrics import accuracy


def build_float_model(cfg: TrainSettings, dataset: Dataset) -> nn.Module:
    """The run's architecture, loaded from ``cfg.init_from`` (float weights) when set."""
    model = build_model(cfg.model, dataset.in_channels, dataset.classes)
    if cfg.init_from:
        state = ckpt.load(cfg.init_from, kind="float")
        if state["config"]["model"] != cfg.model:
            raise ckpt.CheckpointError(f"init_from {cfg.init_from} holds a "
                                       f"{state['config']['model']}, this run trains a "
                                       f"{cfg.model}")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:  # same architecture name, other channels or classes
            raise ckpt.CheckpointError(f"init_from {cfg.init_from} does not fit this run's "
                                       f"{cfg.model} ({dataset.in_channels} input channels, "
                                       f"{dataset.classes} classes): {str(err)[:300]}") from None
    return model


def place_model(model: nn.Module, cfg: TrainSettings, device) -> nn.Module:
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("tensorboard=True needs the tensorboard package "
                         "(pip install tensorboard); the CSV log needs nothing") from None
    return SummaryWriter


class Trainer:
    """Trains one run into ``run_dir`` (checkpoint.pt, log.csv, config.json); resumable.

    The base class trains the float model with cross-entropy (``passes``)."""

    def __init__(self, cfg: TrainSettings, run_dir: str | os.PathLike, resume: bool = False,
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
        if resume and not self.ckpt_path.exists():
            raise ckpt.CheckpointError(f"resume: {self.ckpt_path} does not exist, so there is no "
                                       f"run to continue (without --resume a new run starts)")
        if self.ckpt_path.exists():
            if not resume:
                raise ckpt.CheckpointError(
                    f"{self.ckpt_path} already exists: pass --resume to continue that run or "
                    f"choose another output folder (it is never overwritten by a new run)")
            saved = ckpt.load(self.ckpt_path, kind=self.kind)
            ckpt.check_compatible({**type(cfg).defaults(), **saved["config"]}, asdict(cfg),
                                  type(cfg).SHAPE_KEYS, self.ckpt_path)
        torch.manual_seed(cfg.seed)  # model init (and dropout) reproducible
        self.model = place_model(self.build_model(), cfg, self.device)
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
        self.sampler = random.Random()  # host draws shared by all ranks (reseeded per epoch)
        self.step, self.ema, self.masked = 0, None, None
        self.wall = 0.0  # training seconds so far (over resumes)
        self.setup()
        if saved is not None:
            self._restore(saved)
        else:
            self.fresh_start()
            self.sampler.seed(mix_seed(cfg.seed, 0, 7))

    # -- hooks --
    @property
    def kind(self) -> str:
        """The checkpoint kind (a resume must find the same)."""
        return "float"

    def build_model(self) -> nn.Module:
        return build_float_model(self.cfg, self.ds)

    def setup(self) -> None:
        """Method parts that need the model and the optimizers."""

    def fresh_start(self) -> None:
        """State made before the first step of a new run (not on resume)."""
        self.ema = EMA(self.model, self.cfg.ema_decay, self.cfg.ema_warmup)

    def passes(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Forward and backward passes of one step; returns device scalars to log."""
        logits = self.net(x)
        loss = self.ce(logits, y)
        loss.backward()
        return {"loss": loss.detach(), "acc": accuracy(logits.detach(), y)}

    def on_epoch_start(self, epoch: int) -> str | None:
        """Called before the first step of every epoch; may return a line to print."""
        return None

    def frozen_count(self) -> int:
        return 0

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, saved: dict) -> None:
        pass

    # -- optimizers and schedules --
    def optimizer_groups(self) -> tuple[list, list, list]:
        """(SGD with weight decay, SGD without, Adam) parameter lists."""
        decay, no_decay, steps = [], [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith("_steps"):  # quantizer steps (w_steps, a_steps, a method's)
                steps.append(p)
            elif p.dim() == 4:  # conv weights (stem included)
                decay.append(p)
            else:  # BN copies, FC, biases
                no_decay.append(p)
        return decay, no_decay, steps

    def _build_optimizers(self):
        cfg = self.cfg
        decay, no_decay, steps = self.optimizer_groups()
        wd = cfg.weight_decay
        self.sgd = torch.optim.SGD([{"params": decay, "weight_decay": wd},
                                    {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                   momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        self.optimizers = [self.sgd]
        self.adam = None
        if steps:
            self.adam = EntrywiseAdam(steps, lr=cfg.step_lr)
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

    # -- one step --
    def ce(self, logits, y, scale=1.0):
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
        logs = self.passes(x, y)
        params = [p for p in model.parameters() if p.grad is not None]
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
        if self.masked:
            self.masked.snapshot()
        for opt in self.optimizers:
            opt.step()
        if self.masked:
            self.masked.restore()
        for _, layer in quant_layers(model):
            layer.clamp_steps_()
        if self.ema:
            self.ema.update()
        self.step += 1
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

            bar = tqdm(total=end, initial=self.step, desc=f"train {self.kind}", unit="step",
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
                    message = self.on_epoch_start(epoch)
                    if message and bar:
                        bar.write(message)
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
        frozen = self.frozen_count()
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
            "kind": self.kind, "config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            **self.extra_state(),
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
            self.load_extra_state(saved)
        except (RuntimeError, KeyError, ValueError) as err:
            raise ckpt.CheckpointError(f"checkpoint {self.ckpt_path} does not match this "
                                       f"model: {str(err)[:300]}") from None
        state = saved["rng"]["sampler"]
        self.sampler.setstate((state[0], tuple(state[1]), state[2]))
        torch.set_rng_state(saved["rng"]["torch"])
        if "cuda" in saved["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        self.step, self.wall = saved["step"], saved.get("wall", 0.0)

    @property
    def eval_model(self) -> nn.Module:
        """The model a run is evaluated with: the EMA copy when there is one."""
        return self.ema.model if self.ema else self.model

    def close(self):
        pass
