"""`python -m rfq showcase`: trains through the fused ops and reports every uniform bit-width."""

import subprocess
import sys

import pytest

from rfq.__main__ import main
from rfq.cli import showcase


def test_showcase_trains_one_model_for_all_bit_widths(capsys):
    results = showcase.main(steps=200, seed=1)
    assert sorted(results) == sorted(showcase.CANDIDATES)
    # weights shared across bit-widths: every uniform config of the one model is far above chance
    assert all(acc > 0.8 for acc in results.values()), results
    out = capsys.readouterr().out
    assert "the one model at each uniform bit-width" in out and "turbulence" in out


def test_cli_rejects_bad_steps():
    with pytest.raises(SystemExit):
        main(["showcase", "--steps", "0"])


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "rfq", "showcase", "--steps", "5"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "val accuracy" in out.stdout
