"""Tests for lungs_utils.models: registry, shapes at any size, gradients, segmentation, cost figures."""

from __future__ import annotations

import pytest
import torch

from lungs_utils import LungsError, models

ORIGINAL = {"simple_cnn", "resnet34", "unet", "mobilenet_v2", "vgg16", "vgg19", "vgg_cnn"}
MODERN = {"resnet18", "efficientnet_b0", "resnet_tiny"}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _train_step_ok(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward + backward in train mode; checks logits shape and that every gradient is finite."""
    model.train()
    logits = model(x)
    assert logits.shape == (x.shape[0], 3)
    logits.float().logsumexp(dim=1).mean().backward()
    # Every parameter takes part in classification, except the U-Net's mask head (used by segment()).
    missing = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith("mask_head.")]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return logits


def test_names_cover_original_and_modern_models() -> None:
    names = models.names()
    assert names == sorted(names)
    assert ORIGINAL | MODERN <= set(names)
    assert set(models.ORIGINAL_MODELS) == ORIGINAL


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(LungsError) as excinfo:
        models.build("resnet1000")
    message = str(excinfo.value)
    assert "\n" not in message and "resnet1000" in message
    for name in models.names():
        assert name in message


def test_unknown_option_is_a_lungs_error() -> None:
    with pytest.raises(LungsError, match="dropout"):
        models.build("simple_cnn", drop_out=0.1)
    assert models.options("simple_cnn") == {"dropout": 0.3}
    assert models.build("simple_cnn", dropout=0.1) is not None


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError):
        models.register("simple_cnn")(lambda *, num_classes, in_channels: torch.nn.Identity())


@pytest.mark.parametrize("in_channels", [1, 2])
@pytest.mark.parametrize("name", models.names())
def test_train_step_at_64px(name: str, in_channels: int) -> None:
    model = models.build(name, num_classes=3, in_channels=in_channels)
    _train_step_ok(model, torch.randn(2, in_channels, 64, 64))


@pytest.mark.parametrize("in_channels", [1, 2])
@pytest.mark.parametrize("name", models.names())  # VGGs/U-Net: ~1.5 s each on 2 CPU cores
def test_train_step_at_256px(name: str, in_channels: int) -> None:
    model = models.build(name, num_classes=3, in_channels=in_channels)
    _train_step_ok(model, torch.randn(2, in_channels, 256, 256))


@pytest.mark.parametrize("name", models.names())
def test_odd_sizes_eval(name: str) -> None:
    model = models.build(name).eval()
    with torch.no_grad():
        for size in (72, 100):
            out = model(torch.randn(2, 1, size, size))
            assert out.shape == (2, 3) and torch.isfinite(out).all()
        out = model(torch.randn(1, 1, 100, 72))  # non-square too
        assert out.shape == (1, 3)


@pytest.mark.parametrize("name", models.names())
def test_channels_last_bf16_autocast(name: str) -> None:
    model = models.build(name).to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 64, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _train_step_ok(model, x)


@pytest.mark.parametrize("size", [64, 72, 100, 129])
def test_unet_segment_shape(size: int) -> None:
    model = models.build("unet", in_channels=2)
    assert isinstance(model, models.UNet)
    x = torch.randn(2, 2, size, size + 3)
    mask = model.segment(x)
    assert mask.shape == (2, 1, size, size + 3)
    mask.mean().backward()
    assert model.mask_head.weight.grad is not None


def test_unet_classify_and_segment_matches_single_heads() -> None:
    model = models.build("unet").eval()
    x = torch.randn(2, 1, 72, 72)
    with torch.no_grad():
        logits, mask = model.classify_and_segment(x)
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(mask, model.segment(x))


def test_adapt_first_conv_keeps_hyperparameters() -> None:
    conv = torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    new = models.adapt_first_conv(conv, 2)
    assert (new.in_channels, new.out_channels, new.kernel_size, new.stride, new.padding) == (2, 64, (7, 7), (2, 2), (3, 3))
    assert new.bias is None
    assert models.adapt_first_conv(conv, 3) is conv


def test_describe_resnet18() -> None:
    d128 = models.describe("resnet18", image_size=128)
    d256 = models.describe("resnet18", image_size=256)
    assert d256["name"] == "resnet18"
    # torchvision's 11.69M, less 2/3 of conv1 and the 1000-class fc: 11,171,779.
    assert d256["params"] == pytest.approx(11.17e6, rel=0.005)
    # ~1.8 GMACs at 224 px RGB -> ~4.5 GFLOPs (2 per MAC) at 256 px grayscale.
    assert 4.0e9 < d256["flops"] < 5.0e9
    assert d256["flops"] / d128["flops"] == pytest.approx(4.0, rel=0.05)


def test_describe_instance_keeps_mode_and_uses_its_channels() -> None:
    model = models.build("resnet_tiny", in_channels=2)
    model.train()
    d = models.describe(model, image_size=64)
    assert d["name"] == "TinyResNet" and d["flops"] > 0
    assert d["params"] == sum(p.numel() for p in model.parameters())
    assert model.training


def test_original_unet_and_tiny_sizes_are_plausible() -> None:
    assert 0.3e6 < models.describe("resnet_tiny", 128)["params"] < 1.0e6
    assert models.describe("vgg16", 64)["params"] < 20e6  # no 4096-wide FC layers


def test_summary_table() -> None:
    table = models.summary_table(image_size=64)
    assert list(table.columns) == ["name", "params (M)", "GFLOPs"]
    assert list(table["name"]) == models.names()
    assert (table["params (M)"] > 0).all() and (table["GFLOPs"] > 0).all()
