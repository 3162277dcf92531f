"""The CLI tests' shared runs: a float SmallCNN on digits and a coupled run started from it."""

import pytest

from rfq.cli import main

from cli_args import COMMON


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    assert main(["train", "--out", str(tmp / "float"), "--mode", "float", "--epochs", "5",
                 "--lr", "0.05", "--set", "warmup_epochs=0", *COMMON]) == 0
    assert (tmp / "float" / "model.pt").is_file()
    assert main(["train", "--out", str(tmp / "coupled"), "--profile", "quick", "--epochs", "2",
                 "--steps-per-epoch", "15", "--init-from", str(tmp / "float" / "model.pt"),
                 *COMMON]) == 0
    return tmp
