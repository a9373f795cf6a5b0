"""The network: shapes, identity at initialisation, gradients, checkpoints."""

import json

import pytest
import torch

from stn_align.checkpoint import CheckpointError, load_model, read_metadata, save_model
from stn_align.model import AlignerNet, ModelConfig, global_correlation


@pytest.mark.parametrize("transform", ["affine", "projective"])
def test_identity_at_init_and_shapes(transform):
    torch.manual_seed(0)
    net = AlignerNet(ModelConfig(transform=transform, size=64)).eval()
    a, b = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    estimates = net(a, b, iterations=3)
    assert len(estimates) == 3
    for h in estimates:
        assert h.shape == (3, 3, 3)
        assert torch.allclose(h, torch.eye(3).expand(3, 3, 3), atol=1e-6)


def test_correlation_shape_and_peak():
    f = torch.nn.functional.normalize(torch.randn(2, 16, 8, 8), dim=1)
    corr = global_correlation(f, f)
    assert corr.shape == (2, 64, 8, 8)
    # identical features: each reference cell matches its own input cell best
    assert torch.equal(corr.flatten(2).argmax(1)[0], torch.arange(64))


def test_gradients_reach_encoder_and_head():
    net = AlignerNet(ModelConfig(size=64))
    out = net(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), iterations=2)
    out[-1][:, 0, 2].sum().backward()
    assert net.head.out.weight.grad.abs().sum() > 0
    # the output layer starts at zero, so only it gets gradient before the first update
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    net.zero_grad()
    net(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), iterations=2)[-1][:, 0, 2].sum().backward()
    assert net.encoder.layers[0][0].weight.grad.abs().sum() > 0


def test_checkpoint_round_trip(tmp_path):
    net = AlignerNet(ModelConfig(transform="affine", size=64))
    torch.nn.init.normal_(net.head.out.weight, std=0.01)
    save_model(tmp_path / "m.safetensors", net, {"validation": {"mean_px": 1.5}})
    loaded, meta = load_model(tmp_path / "m.safetensors")
    assert loaded.config == net.config
    assert meta["validation"]["mean_px"] == 1.5
    a, b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    assert torch.allclose(loaded(a, b)[-1], net.eval()(a, b)[-1])


def test_bad_checkpoints_are_clear_errors(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="garbage.safetensors: not a safetensors"):
        load_model(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="no stn-align metadata"):
        read_metadata(foreign)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(2)}, str(wrong), metadata={"stn_align": json.dumps({"model": ModelConfig().to_dict()})})
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(wrong)
    truncated = tmp_path / "truncated.safetensors"
    save_model(truncated, AlignerNet(ModelConfig(size=64)), {})
    truncated.write_bytes(truncated.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_model(truncated)
