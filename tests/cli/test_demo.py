"""`python -m rfq demo --quick`: the main job end to end on Fashion-MNIST (CI installs the
Debian package; the shipped float checkpoint is the starting point)."""

import json
from pathlib import Path

import pytest

from rfq.cli import main
from rfq.data import DEFAULT_FASHION_DIR
from rfq.cli.demo import SHIPPED_FLOAT

HAVE_DATA = (Path(DEFAULT_FASHION_DIR) / "train-images-idx3-ubyte.gz").is_file()


@pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST missing: apt-get install "
                                          "dataset-fashion-mnist (scripts/setup.sh does)")
def test_quick_demo_end_to_end(tmp_path, capsys):
    assert SHIPPED_FLOAT.is_file()
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| coupled, frontier <" in out and "| coupled, greedy <" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [u["bits"] for u in results["uniform"]] == [2, 3, 4, 5, 6]
    assert [s["strategy"] for s in results["searched"]] == ["frontier"] * 4 + ["greedy"]
    for s in results["searched"]:
        assert s["reached"] and s["bitops"] < s["target"]
    # the one model is far above chance at every uniform bit-width from 3 bits on
    assert all(u["accuracy"] > 0.5 for u in results["uniform"] if u["bits"] >= 3)
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    # it ends with the most accurate searched config deployed: the file scores what the
    # fake-quantized model scored (same BN recalibration; 2000 test images: 1 image = 0.05 pt)
    deployed = results["deployed"]
    best = max(s["accuracy"] for s in results["searched"])
    assert deployed["fake_quant_accuracy"] == best
    assert abs(deployed["accuracy"] - best) <= 1 / 2000 + 1e-9
    assert Path(deployed["file"]).stat().st_size == deployed["sizes"]["file"]
    assert deployed["sizes"]["file"] * 3 < deployed["sizes"]["fp32"]  # 5-6 bits: int8 fields
    assert "| 1 |" in out and "| 64 |" in out and "speedup vs fp32" in out


def test_demo_without_data_names_the_package(tmp_path):
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        main(["demo", "--quick", "--out", str(tmp_path), "--data-dir", str(tmp_path / "none")])
