"""Shared by the method tests: scikit-learn's digits and a float SmallCNN trained on them."""

import pytest

from rfq.data import load_digits_dataset

from method_utils import train_float


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory, digits):
    return train_float(tmp_path_factory.mktemp("float"), digits)
