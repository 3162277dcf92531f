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
import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from rfq.data import Dataset
from rfq.methods.rfq.config import TrainConfig
from rfq.methods.rfq.losses import FeatureTap, ar_loss, qe_loss
from rfq.methods.rfq.scheduler import BitWidthScheduler
from rfq.nn import QuantLayer, mixed_layers, quantize_, set_bits
from rfq.training import EMA, MaskedUpdate, Trainer, build_float_model, place_model
from rfq.training.metrics import accuracy


OTHER_METHOD_MODES = ("hotswap",)  # modes whose model another method package builds
RUN_MODEL_BUILDERS: dict = {}  # mode -> fn(float model, cfg) quantizing it in place


def build_run_model(cfg: TrainConfig, dataset: Dataset) -> nn.Module:
    """The model of a run: built, loaded from ``init_from`` (float weights), quantized (and set
    to ``lsq_config`` when it trains one mixed config alone)."""
    model = build_float_model(cfg, dataset)
    if cfg.mode in OTHER_METHOD_MODES:
        # another method's run (its package registers its builder when imported): loading a
        # checkpoint needs no static import of the methods below this one
        importlib.import_module(f"rfq.methods.{cfg.mode}")
        RUN_MODEL_BUILDERS[cfg.mode](model, cfg)
    elif cfg.mode != "float":
        quantize_(model, cfg.quant_config())
        if cfg.lsq_config is not None:
            set_fixed_config(model, cfg.lsq_config)
    return model


def set_fixed_config(model: nn.Module, config: dict) -> None:
    """Set an LSQ-alone run's one mixed config; it must name every mixed layer."""
    names = {n for n, _ in mixed_layers(model)}
    missing, unknown = sorted(names - set(config)), sorted(set(config) - names)
    if missing or unknown:
        raise ValueError(f"lsq_config does not fit this model: missing layers {missing[:4]}, "
                         f"unknown layers {unknown[:4]}")
    try:
        set_bits(model, {n: tuple(v) for n, v in config.items()})
    except ValueError as err:
        raise ValueError(f"lsq_config: {err}") from None


def load_model(cfg: TrainConfig, dataset: Dataset, device="cpu") -> nn.Module:
    """``build_run_model`` on ``device``, in the run's memory format."""
    return place_model(build_run_model(cfg, dataset), cfg, device)


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


class CoupledTrainer(Trainer):
    """The main method's trainer: the coupled step above (mode "coupled"), or one of the two
    baselines it is compared with: the float model (mode "float") and one bit-width trained
    alone with LSQ (mode "lsq")."""

    cfg: TrainConfig

    @property
    def kind(self) -> str:
        return self.cfg.mode

    def build_model(self) -> nn.Module:
        return build_run_model(self.cfg, self.ds)

    def setup(self) -> None:
        cfg = self.cfg
        coupled = cfg.mode == "coupled"
        self.scheduler = None
        if coupled and cfg.scheduler:
            self.scheduler = BitWidthScheduler(
                self.model, cfg.epochs, cfg.freeze_start, cfg.p_early,
                cfg.p_late or math.ceil(cfg.epochs / 10), ratio_max=cfg.ratio_max,
                ratio_min=cfg.ratio_min, shared_sets=cfg.quant_config().shared_sets)
        self.tap = FeatureTap(self.model) if coupled and cfg.idm else None
        self.masked = MaskedUpdate(self.model, self.optimizers) \
            if coupled and cfg.masked_update else None

    def fresh_start(self) -> None:
        if self.cfg.mode != "float":
            initialize_activation_steps(self.model, self.stream.batch(0, 0)[0])
            if self.cfg.lsq_config is not None:  # the init leaves every layer at its highest
                set_fixed_config(self.model, self.cfg.lsq_config)
            self.ema = EMA(self.model, self.cfg.ema_decay, self.cfg.ema_warmup)

    def on_epoch_start(self, epoch: int) -> str | None:
        if self.scheduler:
            frozen = self.scheduler.step(self.model, epoch)
            if frozen:
                return f"epoch {epoch}: scheduler froze the lowest bit of {len(frozen)} layers"
        return None

    def frozen_count(self) -> int:
        return len(self.scheduler.frozen_layers()) if self.scheduler else 0

    def extra_state(self) -> dict:
        return {"scheduler": self.scheduler.state_dict() if self.scheduler else None}

    def load_extra_state(self, saved: dict) -> None:
        if self.scheduler and saved["scheduler"]:
            self.scheduler.load_state_dict(saved["scheduler"])

    def passes(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        if self.cfg.mode == "coupled":
            return self._coupled_passes(x, y)
        return super().passes(x, y)

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

    def step_configs(self) -> list[dict]:
        """The configs of one step's random passes (drawn on the host, in order)."""
        return [self.sample_config() for _ in range(self.cfg.n_random)]

    def min_weight_bit(self, name: str, layer: QuantLayer) -> int:
        return min(self.scheduler.w_sets[name]) if self.scheduler else min(layer.w_bits)

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
        configs = self.step_configs()
        layers = mixed_layers(model)
        if self.tap:
            self.tap.mode = "teacher"
            self.tap.selected = set().union(*(self._idm_layers(c, layers) for c in configs))
        with sync() if passes > 1 else contextlib.nullcontext():
            z0 = self.net(x)
            loss0 = self.ce(z0, y)
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
                    loss = self.ce(z, y, 0.5) + 0.5 * F.kl_div(
                        F.log_softmax(z.float(), 1), p_teacher, reduction="batchmean")
                else:
                    loss = self.ce(z, y)
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

    def close(self):
        if self.tap:
            self.tap.close()
