"""Shared by the search tests: an untrained quantized ResNet-20 with its cost model."""

import pytest

from rfq.cost import CostModel
from rfq.models import build_model
from rfq.nn import quantize_


@pytest.fixture(scope="module")
def resnet20():
    model = quantize_(build_model("resnet20", 1, 10)).eval()
    return model, CostModel(model, (1, 28, 28))
