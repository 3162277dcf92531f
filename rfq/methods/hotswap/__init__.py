"""Hot-swap bit-width, inspired by One Model for All (Sun et al., arXiv 2105.01353; spec
../shared/spec/methods_seeds.md §B.2 is our design, not the paper's, which has no public code).

One model trained once switches every layer between 8 and 1 bits at run time: the direct LSQ
path at 4..8 bits, the Haar wavelet path (each band its own step) at 3, 2 and 1.

    haar.py     the orthonormal Haar transform over channel axes, the Haar-domain conv
    modules.py  HotSwapConv2d / HotSwapLinear and ``hotswap_(model)``
    trainer.py  the sandwich-rule step on the main method's coupled step and the shared trainer
(a bit-width's deploy file: rfq.deploy.methods.export_hotswap, or rfq export)
"""

from rfq.methods.hotswap.modules import (HOTSWAP_BITS, WAVELET_MAX_BITS, HotSwapConv2d,
                                         HotSwapLinear, freeze, hotswap_, hotswap_config,
                                         unfreeze)


def _build_run_model(model, cfg):
    hotswap_(model, tuple(cfg.bits), cfg.wavelet)


def _register() -> None:
    from rfq.methods.rfq.trainer import RUN_MODEL_BUILDERS

    RUN_MODEL_BUILDERS["hotswap"] = _build_run_model


_register()

__all__ = ["HOTSWAP_BITS", "WAVELET_MAX_BITS", "HotSwapConv2d", "HotSwapLinear", "freeze",
           "hotswap_", "hotswap_config", "unfreeze"]
