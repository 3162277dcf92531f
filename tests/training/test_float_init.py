"""build_float_model: a float checkpoint that does not fit the run is a clear CheckpointError."""

import pytest

from rfq import checkpoint as ckpt
from rfq.data import load_digits_dataset
from rfq.methods.rfq import TrainConfig
from rfq.models import build_model
from rfq.training import build_float_model


def test_float_checkpoint_of_other_classes_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    other = build_model("smallcnn", 1, 3)  # 3 classes; digits has 10
    ckpt.save_atomic({"kind": "float", "config": {"model": "smallcnn"},
                      "model": other.state_dict()}, path)
    cfg = TrainConfig(model="smallcnn", dataset="digits", init_from=str(path))
    with pytest.raises(ckpt.CheckpointError, match="does not fit this run's smallcnn "
                                                    r"\(1 input channels, 10 classes\)"):
        build_float_model(cfg, load_digits_dataset())


def test_coupled_checkpoint_is_not_a_float_init(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.save_atomic({"kind": "coupled", "config": {"model": "smallcnn"}, "model": {}}, path)
    cfg = TrainConfig(model="smallcnn", dataset="digits", init_from=str(path))
    with pytest.raises(ckpt.CheckpointError, match="holds a 'coupled' model, expected 'float'"):
        build_float_model(cfg, load_digits_dataset())
