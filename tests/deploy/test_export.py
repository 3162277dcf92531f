"""rfq.deploy: export -> file -> load gives the fake-quantized model's function from packed
codes; the file holds each layer's exact integer codes at its own bit-width (read here by an
independent numpy reader too); sizes follow the stated layout; bad files are refused whole."""

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from rfq import deploy, ops
from rfq.deploy import format as fmt
from rfq.deploy.format import DeployFormatError
from rfq.models import build_model
from rfq.nn import QuantConfig, quant_layers
from rfq.nn.packed import PackedLayer

from deploy_cases import INPUT, example_input, quantized_model
from independent_reader import read_codes, read_layer


def expected_codes(model) -> dict[str, torch.Tensor]:
    """Each layer's LSQ codes at its current bits, flattened to [N, K]."""
    out = {}
    for name, layer in quant_layers(model):
        step = layer.w_steps.detach()[layer.w_index].reshape(1)
        codes = ops.quantize_codes(layer.weight.detach(), step, layer.w_bit, True)
        out[name] = codes.reshape(codes.shape[0], -1)
    return out


def assert_same_function(ref: torch.Tensor, got: torch.Tensor) -> None:
    """Equal up to float rounding: BN folding reorders the arithmetic and packed_linear rounds
    its inputs to int16 per block; a rounding difference can move a value across a quantizer
    boundary downstream (one step of one activation), so the bound is relative to the output."""
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=2e-3 * ref.abs().max().item())


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 9), k=st.integers(1, 300),
       seed=st.integers(0, 2**31 - 1))
def test_fields_round_trip_exactly(bits, n, k, seed):
    lo, hi = ops.qrange(bits, True)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    if bits == 1:
        codes = torch.where(codes == 0, torch.ones_like(codes), codes)
    data = fmt.pack_fields(codes, bits)
    assert data.dtype == torch.uint8 and data.numel() == fmt.dense_bytes(n, k, bits)
    assert torch.equal(fmt.unpack_fields(data, bits, n, k), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_at_every_bit_width(bits, tmp_path):
    qc = QuantConfig(bits=(bits,), first_bits=bits, last_bits=bits)
    model = quantized_model("smallcnn", bits, qc)
    path = deploy.export(model, tmp_path / "m.safetensors")
    loaded = deploy.load(path)
    want = expected_codes(model)
    packed = {n: m for n, m in loaded.named_modules() if isinstance(m, PackedLayer)}
    assert set(packed) == set(want)
    for name, layer in packed.items():
        assert layer.w_bit == bits
        assert torch.equal(layer.codes(), want[name]), name
    # both scale kinds: convs carry a folded BN (per-row scale), the FC one LSQ step
    assert packed["body1.0"].group_size > 0 and packed["head.fc"].group_size == 0
    x = example_input("smallcnn", 32)
    with torch.no_grad():
        assert_same_function(model(x), loaded(x))


@torch.no_grad()
def assert_each_layer_matches(model, deployed, x) -> None:
    """Every deployed layer on the input its fake-quantized twin saw equals that layer followed
    by its folded BN (no downstream quantizer can amplify a rounding difference here)."""
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in quant_layers(model)]
    model(x)
    for h in hooks:
        h.remove()
    checked = 0
    for name, layer in deployed.named_modules():
        if not isinstance(layer, PackedLayer):
            continue
        ref = model.get_submodule(name)(inputs[name])
        if layer.bn_name is not None:
            ref = model.get_submodule(layer.bn_name)(ref)
        torch.testing.assert_close(layer(inputs[name]), ref, rtol=1e-4,
                                   atol=1e-4 * ref.abs().max().item(), msg=name)
        checked += 1
    assert checked == len(quant_layers(model))


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "mobilenetv2"])
def test_mixed_configs_match_the_fake_quantized_model(name, tmp_path):
    model = quantized_model(name, None, seed=3)
    path = deploy.export(model, tmp_path / "m.safetensors",
                         arch={**deploy.infer_arch(model), "input_shape": list(INPUT[name])})
    x = example_input(name, 4)
    for dense in ("auto", "all", "none"):
        loaded = deploy.load(path, dense=dense)
        assert_each_layer_matches(model, loaded, x)
        assert_each_layer_matches(model, loaded, x[:1])  # few positions: packed reads
    if name != "mobilenetv2":  # (its 52 quantizers in a row do flip a boundary or two here)
        with torch.no_grad():
            assert_same_function(model(x), deploy.load(path)(x))
    if name == "mobilenetv2":
        dw = [m for m in loaded.modules() if isinstance(m, PackedLayer) and m.groups > 1]
        assert dw and all(m.weight_shape[1] == 1 for m in dw)
    want = expected_codes(model)
    for layer, codes in read_codes(str(path)).items():
        assert np.array_equal(codes, want[layer].numpy()), layer


def test_independent_reader_reproduces_codes_and_steps(tmp_path):
    model = quantized_model("resnet20", None, seed=5)
    path = deploy.export(model, tmp_path / "m.safetensors")
    codes = read_codes(str(path))
    want = expected_codes(model)
    assert set(codes) == set(want)
    for layer, c in codes.items():
        assert c.dtype == np.int8 and np.array_equal(c, want[layer].numpy()), layer
    fc = read_layer(str(path), "head.fc")
    step = model.head.fc.w_steps.detach()[model.head.fc.w_index]
    assert fc["record"]["bn"] is None and fc["scale"][0] == np.float32(step.item())
    conv = read_layer(str(path), "blocks.0.conv1")
    bn = model.blocks[0].bn1
    i, j = bn.wi, bn.ai
    gain = bn.weight[i, j] / torch.sqrt(bn.running_var[i, j] + bn.eps)
    layer = model.blocks[0].conv1
    np.testing.assert_allclose(conv["scale"],
                               (layer.w_steps[layer.w_index] * gain).detach().numpy(), rtol=1e-6)


def test_file_size_is_the_dense_fields_plus_per_layer_tensors(tmp_path):
    model = quantized_model("resnet20", None, seed=7)
    path = deploy.export(model, tmp_path / "m.safetensors")
    sizes = deploy.file_sizes(path)
    expect = ideal = 0
    for _, layer in quant_layers(model):
        numel = layer.weight.numel()
        expect += -(-numel * ops.container_bits(layer.w_bit) // 8)
        ideal += numel * layer.w_bit / 8
    assert sizes["codes"] == expect and sizes["codes_ideal"] == ideal
    float_model = build_model("resnet20", 1, 10)
    assert sizes["fp32"] == sum(t.numel() * t.element_size()
                                for t in float_model.state_dict().values())
    assert sizes["file"] < sizes["fp32"] / 4


def test_load_needs_only_the_file_and_does_not_touch_a_given_model(tmp_path):
    model = quantized_model("smallcnn", 4)
    path = deploy.export(model, tmp_path / "m.safetensors")
    skeleton = build_model("smallcnn", 1, 10)
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    loaded = deploy.load(path, model=skeleton)
    assert all(torch.equal(v, before[k]) for k, v in skeleton.state_dict().items())
    assert isinstance(skeleton.body1[0], torch.nn.Conv2d) and not loaded.training
    x = example_input("smallcnn", 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), deploy.load(path)(x))
        assert torch.equal(deploy.to_packed(model)(x), loaded(x))


def test_compile_fullgraph_of_the_loaded_model(tmp_path):
    torch._dynamo.reset()
    model = quantized_model("smallcnn", None, seed=2)
    loaded = deploy.load(deploy.export(model, tmp_path / "m.safetensors"))
    x = example_input("smallcnn", 4)
    with torch.no_grad():
        eager = loaded(x)
        compiled = torch.compile(loaded, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


# ---- bad input: a clear error naming what is wrong, nothing returned half-built --------------

@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    model = quantized_model("smallcnn", 3)
    return deploy.export(model, tmp_path_factory.mktemp("deploy") / "m.safetensors")


def _rewrite(src, dst, edit):
    tensors, meta = fmt.read(src)
    meta = {k: v for k, v in meta.items()}
    edit(tensors, meta)
    from safetensors.torch import save_file
    raw = {k: json.dumps(v) for k, v in meta.items() if k != "format_version"}
    raw.setdefault("format", fmt.FORMAT)
    raw["format_version"] = str(meta.get("format_version", fmt.VERSION))
    if "format" in meta:
        raw["format"] = meta["format"]
    save_file(tensors, str(dst), metadata=raw)
    return dst


def test_truncated_file(good_file, tmp_path):
    data = good_file.read_bytes()
    for cut in (4, 100, len(data) - 10):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(DeployFormatError, match="too short|truncated|not a safetensors"):
            deploy.load(bad)


def test_file_from_another_tool(tmp_path):
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other), metadata={"format": "pt"})
    with pytest.raises(DeployFormatError, match="not an rfq deploy file"):
        deploy.load(other)
    pickled = tmp_path / "old.rfq"
    torch.save({"kind": "packed", "state": {}}, pickled)
    with pytest.raises(DeployFormatError, match="pickled torch file.*re-export"):
        deploy.load(pickled)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a model at all")
    with pytest.raises(DeployFormatError, match="not a safetensors file|truncated"):
        deploy.load(text)
    with pytest.raises(DeployFormatError, match="does not exist"):
        deploy.load(tmp_path / "missing.safetensors")


def test_bit_width_the_format_does_not_allow(good_file, tmp_path):
    def edit(tensors, meta):
        meta["layers"]["body1.0"]["bits"] = 9
    with pytest.raises(DeployFormatError, match="layer body1.0: bit-width 9 is not allowed"):
        deploy.load(_rewrite(good_file, tmp_path / "b.safetensors", edit))

    def edit_size(tensors, meta):  # 3-bit codes (4-bit fields) claimed as 2-bit
        meta["layers"]["body1.0"]["bits"] = 2
    with pytest.raises(DeployFormatError, match=r"body1.0.codes is torch.uint8 \[2304\], "
                                                r"expected torch.uint8 \[1152\] for 2-bit"):
        deploy.load(_rewrite(good_file, tmp_path / "s.safetensors", edit_size))

    def edit_codes(tensors, meta):  # 8-bit codes claimed as 7-bit: same int8 fields
        meta["layers"]["head.fc"]["bits"] = 7
    with pytest.raises(DeployFormatError, match=r"layer head.fc: codes outside \[-64, 63\]"):
        deploy.load(_rewrite(good_file, tmp_path / "c.safetensors", edit_codes))


def test_version_mismatch(good_file, tmp_path):
    def edit(tensors, meta):
        meta["format_version"] = fmt.VERSION + 1
    with pytest.raises(DeployFormatError, match=f"version '{fmt.VERSION + 1}'.*upgrade rfq"):
        deploy.load(_rewrite(good_file, tmp_path / "v.safetensors", edit))


def test_missing_or_misshapen_tensor(good_file, tmp_path):
    def edit(tensors, meta):
        del tensors["body2.0.scale"]
    with pytest.raises(DeployFormatError, match="body2.0.scale is missing"):
        deploy.load(_rewrite(good_file, tmp_path / "m.safetensors", edit))

    def edit2(tensors, meta):
        tensors["body2.0.codes"] = tensors["body2.0.codes"][:-1].clone()
    with pytest.raises(DeployFormatError, match="body2.0.codes is torch.uint8"):
        deploy.load(_rewrite(good_file, tmp_path / "n.safetensors", edit2))


def test_config_that_does_not_match_the_model(good_file):
    with pytest.raises(DeployFormatError, match="does not match the model ResNet20"):
        deploy.load(good_file, model=build_model("resnet20", 1, 10))
    wider = build_model("smallcnn", 1, 10)
    wider.body1[0] = torch.nn.Conv2d(16, 48, 3, 1, 1, bias=False)
    with pytest.raises(DeployFormatError, match=r"body1.0: weight \[48, 16, 3, 3\]"):
        deploy.load(good_file, model=wider)


def test_export_refuses_a_float_model_and_a_bad_dense_policy(good_file, tmp_path):
    with pytest.raises(ValueError, match="no quantized layer"):
        deploy.export(build_model("smallcnn", 1, 10), tmp_path / "f.safetensors")
    assert not (tmp_path / "f.safetensors").exists()
    with pytest.raises(ValueError, match="dense must be one of"):
        deploy.load(good_file, dense="sometimes")


def test_header_length_beyond_the_file(tmp_path):
    bad = tmp_path / "h.safetensors"
    bad.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(DeployFormatError, match="header claims"):
        deploy.load(bad)
