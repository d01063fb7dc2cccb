"""Evaluation used by the training loop: latents, decoder accuracy, information-plane point, robustness.

Plain functions returning floats and dicts of floats; nothing here touches the disk.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ibbench.attacks import (
    ATTACK_LOSSES,
    DEFAULT_EPS,
    WORST,
    AttackSettings,
    accuracy_curves,
    attack_suite,
    eval_mode,
    masking_diagnostics,
    robustness_curve,
    zero_gradient_share,
)
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
    """x (N, ...) -> encoder -> decoder -> logits (N, C), the model the attacks see.

    noise_draws = 0 (the default): the latent noise is off, a deterministic model. noise_draws = N ≥ 1: the
    noisy model of the paper, p(y|x) = E_ε[p(y | z + ε)], estimated with N fresh zero-entropy noise draws on
    every forward; its logits are log of the mean softmax, so a gradient through them is the expectation over
    transformation (EOT) over N draws (Athalye et al. 2018), and its prediction the Monte-Carlo predictive.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        noise_draws: int = 0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if noise_draws < 0:
            raise ValueError(f"noise_draws must be ≥ 0, got {noise_draws}")
        self.encoder = encoder
        self.decoder = decoder
        self.noise_draws = noise_draws
        self.generator = generator  # noise draws; None: the global RNG

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) for inputs x (N, ...), differentiable in x."""
        z = self.encoder(x)
        if self.noise_draws == 0:
            return self.decoder(z)
        log_probs = [
            F.log_softmax(self.decoder(add_zero_entropy_noise(z, self.generator)), 1) for _ in range(self.noise_draws)
        ]
        return torch.logsumexp(torch.stack(log_probs), 0) - math.log(self.noise_draws)


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
    pgd_steps: int = 10,
    generator: torch.Generator | None = None,
) -> dict[float, float]:
    """Accuracy (fraction in [0, 1]) per eps of encoder + decoder (noise off) on pixels x (N, ...) under one attack."""
    model = EncoderDecoder(encoder, decoder)
    return robustness_curve(model, x, y, eps_list, attack, batch_size, pgd_steps, generator)


def stratified_subset(y: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Sorted indices (M,) of a fixed class-stratified subset of labels y (N,): M = min(size, N).

    Each class keeps its share of the set (largest remainders round), drawn by a generator seeded with `seed`,
    so every run, decoder and attack of a sweep sees the same images.
    """
    n = y.shape[0]
    if size < 1:
        raise ValueError(f"size must be ≥ 1, got {size}")
    if size >= n:
        return torch.arange(n, device=y.device)
    classes, counts = torch.unique(y.cpu(), return_counts=True)
    quota = counts.double() * size / n
    take = quota.floor().long()
    extra = size - int(take.sum())
    take[torch.argsort(quota - take, descending=True, stable=True)[:extra]] += 1
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = (y.cpu() == label).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen).sort().values.to(y.device)


def robustness_suite(
    encoder: nn.Module,
    decoders: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    eps_list: Sequence[float],
    settings: AttackSettings,
    eot_draws: int = 0,
) -> dict[str, dict]:
    """Attack every decoder through the encoder on pixels x (N, ...), labels y (N,); accuracies are fractions.

    Returns {"robustness": {decoder: {attack: {eps: accuracy}}} with the per-image "worst" among the attacks,
    "masking": {decoder: attacks.masking_diagnostics(...)}}. The zero-gradient share is measured on the
    deterministic model (noise off), where a saturated softmax blinds the cross-entropy attacks.
    """
    robustness, masking = {}, {}
    chance = float(torch.bincount(y).max()) / max(y.shape[0], 1)  # a constant classifier's best accuracy
    for name, decoder in decoders.items():
        started = time.perf_counter()
        # A fresh noise generator per decoder: each decoder's EOT draws are reproducible on their own.
        generator = torch.Generator(device=x.device).manual_seed(settings.seed) if eot_draws else None
        model = EncoderDecoder(encoder, decoder, eot_draws, generator)
        curves = accuracy_curves(attack_suite(model, x, y, eps_list, settings))
        zero = zero_gradient_share(EncoderDecoder(encoder, decoder), x, y, settings.batch_size)
        robustness[name] = curves
        masking[name] = masking_diagnostics(curves, zero, chance)
        log.debug("attacks on %s took %.2f s", name, time.perf_counter() - started)
    return {"robustness": robustness, "masking": masking}


def attack_settings_record(settings: AttackSettings, eot_draws: int, images: int, of: int) -> dict:
    """The attack settings as summary.json records them: what was run, how hard, on which images, noise or not."""
    return {
        "attacks": list(settings.attacks),
        "losses": {name: ATTACK_LOSSES[name] for name in settings.attacks},
        "worst": WORST,
        "pgd_steps": settings.pgd_steps,
        "pgd_restarts": settings.pgd_restarts,
        "pgd_step_size": settings.pgd_step_size,
        "apgd_steps": settings.apgd_steps,
        "apgd_restarts": settings.apgd_restarts,
        "square_queries": settings.square_queries,
        "seed": settings.seed,
        "images": images,
        "test_images": of,
        "subset": "class-stratified",
        "eot_draws": eot_draws,
        "latent_noise": f"EOT over {eot_draws} draws" if eot_draws else "off",
    }
