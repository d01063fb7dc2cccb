"""Encoders: shapes, size, normalisation inside the model, memory formats, registry errors."""

from __future__ import annotations

import copy

import pytest
import torch

from ibbench.models import DEFAULT_MEAN, DEFAULT_STD, ENCODERS, make_encoder
from ibbench.registry import UnknownNameError

DIGITS = (1, 8, 8)
CIFAR = (3, 32, 32)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", ["resnet18", "cnn", "mlp"])
@pytest.mark.parametrize("shape", [DIGITS, CIFAR])
def test_output_shape(name: str, shape: tuple[int, int, int]) -> None:
    model = make_encoder(name, shape, 16)
    z = model(torch.rand(3, *shape))
    assert z.shape == (3, 16)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()


def test_registered_names() -> None:
    assert ENCODERS.names() == ["cnn", "mlp", "resnet18"]


def test_resnet18_parameter_count() -> None:
    model = make_encoder("resnet18", CIFAR, 256)
    count = sum(p.numel() for p in model.parameters())
    # The CIFAR ResNet-18 trunk has 11,168,832 parameters; the 512 -> 256 head adds 131,328.
    assert count == 11_168_832 + 512 * 256 + 256
    assert abs(count - 11.2e6) / 11.2e6 < 0.01


def test_resnet18_cifar_stem() -> None:
    body = make_encoder("resnet18", CIFAR, 8).body
    assert body.conv1.kernel_size == (3, 3) and body.conv1.stride == (1, 1)
    assert isinstance(body.maxpool, torch.nn.Identity)
    assert [len(layer) for layer in (body.layer1, body.layer2, body.layer3, body.layer4)] == [2, 2, 2, 2]


@pytest.mark.parametrize("name", ["resnet18", "cnn", "mlp"])
def test_normalisation_is_inside(name: str) -> None:
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = make_encoder(name, CIFAR, 8, mean=mean, std=std).eval()
    buffers = dict(model.named_buffers())
    assert torch.allclose(buffers["normalize.mean"].flatten(), torch.tensor(mean))
    assert torch.allclose(buffers["normalize.std"].flatten(), torch.tensor(std))

    seen: list[torch.Tensor] = []
    model.body.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x = torch.rand(2, *CIFAR)
    model(x)
    expected = (x - torch.tensor(mean).reshape(1, 3, 1, 1)) / torch.tensor(std).reshape(1, 3, 1, 1)
    assert torch.allclose(seen[0], expected, atol=1e-6)

    # An image equal to the mean reaches the body as exact zeros.
    model(torch.tensor(mean).reshape(1, 3, 1, 1).expand(1, 3, 32, 32))
    assert seen[1].abs().max() < 1e-6


def test_default_normalisation_maps_unit_interval_to_symmetric() -> None:
    model = make_encoder("mlp", DIGITS, 4)
    assert (DEFAULT_MEAN, DEFAULT_STD) == (0.5, 0.5)
    assert torch.equal(
        model.normalize(torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1)).flatten(), torch.tensor([-1.0, 1.0])
    )


def test_statistics_follow_the_module_to_state_dict() -> None:
    model = make_encoder("cnn", DIGITS, 4, mean=[0.3], std=[0.2])
    state = model.state_dict()
    assert "normalize.mean" in state and "normalize.std" in state
    clone = make_encoder("cnn", DIGITS, 4)
    clone.load_state_dict(state)
    assert torch.allclose(clone.normalize.std.flatten(), torch.tensor([0.2]))


@pytest.mark.parametrize("name", ["resnet18", "cnn", "mlp"])
def test_channels_last_input(name: str) -> None:
    model = make_encoder(name, CIFAR, 8).eval()
    x = torch.rand(2, *CIFAR)
    z = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    z_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(z, z_cl, atol=1e-5)


def test_gradient_reaches_pixels() -> None:
    model = make_encoder("cnn", DIGITS, 4).eval()
    x = torch.rand(2, *DIGITS, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as err:
        make_encoder("vgg", CIFAR, 8)
    message = str(err.value)
    assert "vgg" in message
    for name in ("resnet18", "cnn", "mlp"):
        assert name in message


def test_bad_statistics_and_shapes_refused() -> None:
    with pytest.raises(ValueError, match="3 channels"):
        make_encoder("cnn", CIFAR, 8, mean=[0.5], std=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="positive"):
        make_encoder("cnn", CIFAR, 8, mean=[0.5] * 3, std=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="input_shape"):
        make_encoder("cnn", (32, 32), 8)
    with pytest.raises(ValueError, match="latent_dim"):
        make_encoder("cnn", CIFAR, 0)


@pytest.mark.parametrize("name", ["mlp", "cnn", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_the_latent_layer_runs_in_float32_under_bf16_autocast(name):
    """The estimator must see float32 latents, not bf16-rounded ones (CPU autocast stands in for CUDA's)."""
    shape = DIGITS if name != "resnet18" else CIFAR
    model = make_encoder(name, shape, 16).eval()
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.body(model.normalize(x))
        z = model(x)
    assert features.dtype == torch.bfloat16  # the body did run in bf16
    assert z.dtype == torch.float32
    with torch.no_grad():
        expected = model.latent(features.float())  # the float32 layer on the autocast features
    torch.testing.assert_close(z, expected, rtol=0, atol=0)
    assert not torch.equal(z, z.bfloat16().float())  # not rounded to bf16


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18"])
def test_encoders_on_cuda_compute_the_cpu_latents(name):
    """The same weights on both devices: IEEE float32 gives the CPU's latents up to rounding; under CUDA bf16
    autocast the body runs in bf16 and the latent layer in float32, within bf16's error of the float32 latent."""
    shape = DIGITS if name != "resnet18" else CIFAR
    model = make_encoder(name, shape, 16).eval()
    x = torch.rand(16, *shape, generator=torch.Generator().manual_seed(0))
    gpu = copy.deepcopy(model).cuda()
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision = conv.fp32_precision = "ieee"  # no TF32: what `tf32: false` (the default) runs
    try:
        with torch.no_grad():
            z_cpu = model(x)
            z_gpu = gpu(x.cuda())
            with torch.autocast("cuda", dtype=torch.bfloat16):
                features = gpu.body(gpu.normalize(x.cuda()))
                z_bf16 = gpu(x.cuda())
            expected = gpu.latent(features.float())
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
    assert z_gpu.is_cuda and z_gpu.dtype == torch.float32
    torch.testing.assert_close(z_gpu.cpu(), z_cpu, rtol=1e-4, atol=1e-4)
    assert features.dtype == torch.bfloat16 and z_bf16.dtype == torch.float32
    torch.testing.assert_close(z_bf16, expected, rtol=0, atol=0)  # the latent layer itself in float32
    relative = float((z_bf16.cpu() - z_cpu).norm() / z_cpu.norm())
    assert 0 < relative < 0.05, relative  # bf16's 8-bit mantissa through the body: about a percent
