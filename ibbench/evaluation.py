"""Evaluation used by the training loop: latents, decoder accuracy, information-plane point, robustness.

Plain functions returning floats and dicts of floats; nothing here touches the disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ibbench.attacks import DEFAULT_EPS, eval_mode, robustness_curve
from ibbench.decoders import Decoder, ResFCDecoder, fit_decoder
from ibbench.estimators import add_zero_entropy_noise, knn_entropy

log = logging.getLogger(__name__)


def _device_of(module: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return fallback


def encode(
    encoder: nn.Module,
    x: torch.Tensor,
    batch_size: int = 512,
    noise: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Latents (N, d) float32 on x's device for inputs x (N, ...), in eval mode without gradient.

    With noise=True the zero-entropy noise N(0, I/(2πe)) is added, drawn from `generator` (on z's device) or
    the global RNG. The encoder's previous train/eval modes are restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    device = _device_of(encoder, x.device)
    chunks = []
    with eval_mode(encoder), torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            chunks.append(encoder(x[start : start + batch_size].to(device)).float().to(x.device))
    z = torch.cat(chunks)
    if noise:
        z = add_zero_entropy_noise(z, generator=generator)
    return z


class EncoderDecoder(nn.Module):
    """x (N, ...) -> encoder -> decoder -> logits (N, C), with the latent noise OFF, as the attacks use it."""

    def __init__(self, encoder: nn.Module, decoder: Decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) for inputs x (N, ...), differentiable in x."""
        return self.decoder(self.encoder(x))


def fit_decoders(
    names: Iterable[str], z_train: torch.Tensor, y_train: torch.Tensor, num_classes: int
) -> dict[str, Decoder]:
    """Each named decoder fitted on latents z_train (N, d) and labels y_train (N,), keyed by name."""
    decoders = {}
    for name in names:
        started = time.perf_counter()
        decoders[name] = fit_decoder(name, z_train, y_train, num_classes)
        log.debug("decoder %s fitted in %.2f s", name, time.perf_counter() - started)
    return decoders


def decoder_accuracy(decoder: nn.Module, z: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
    """Fraction in [0, 1] of latents z (N, d) whose argmax logit equals y (N,)."""
    if z.shape[0] != y.shape[0] or z.shape[0] == 0:
        raise ValueError(f"need as many labels as latents (≥ 1), got {z.shape[0]} and {y.shape[0]}")
    correct = 0
    with eval_mode(decoder), torch.no_grad():
        for start in range(0, z.shape[0], batch_size):
            logits = decoder(z[start : start + batch_size])
            correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    return correct / z.shape[0]


def _mean_cross_entropy(decoder: nn.Module, z: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
    """Mean cross-entropy (nats) of decoder's logits on z (N, d) against labels y (N,)."""
    total = 0.0
    with eval_mode(decoder), torch.no_grad():
        for start in range(0, z.shape[0], batch_size):
            logits = decoder(z[start : start + batch_size])
            total += float(F.cross_entropy(logits, y[start : start + batch_size].long(), reduction="sum"))
    return total / z.shape[0]


def information_plane(
    z_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    k: int,
    width: int = 1024,
    blocks: int = 5,
    max_epochs: int = 100,
) -> dict[str, float]:
    """{"i_xz", "h_y_given_z"} in nats for test latents z_test (N, d) and labels y_test (N,).

    Pass z_test WITH the zero-entropy noise (encode(..., noise=True)): for a deterministic encoder
    I[X;Z] = H[Z], estimated by knn_entropy(z_test, k). h_y_given_z is the mean cross-entropy over all of
    z_test of a ResFC decoder (width, blocks, max_epochs; smaller values are faster) fitted on these same test
    latents, as in the paper: an upper bound on H[Y|Z] = I[X;Y|Z] up to the decoder's fit to this sample.
    """
    i_xz = float(knn_entropy(z_test.detach(), k=k))
    decoder = ResFCDecoder(z_test.shape[1], num_classes, width=width, blocks=blocks, max_epochs=max_epochs)
    decoder.fit(z_test, y_test)
    h_y_given_z = _mean_cross_entropy(decoder, z_test.detach().float(), y_test)
    return {"i_xz": i_xz, "h_y_given_z": h_y_given_z}


def robustness(
    encoder: nn.Module,
    decoder: Decoder,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_list: Sequence[float] = DEFAULT_EPS,
    attack: str = "fgsm",
    batch_size: int = 256,
) -> dict[float, float]:
    """Accuracy (fraction in [0, 1]) per eps of encoder + decoder (noise off) on pixels x (N, ...)."""
    model = EncoderDecoder(encoder, decoder)
    return robustness_curve(model, x, y, eps_list, attack=attack, batch_size=batch_size)
