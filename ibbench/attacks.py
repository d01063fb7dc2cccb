"""L∞ adversarial attacks on [0, 1] pixels (FGSM, PGD) and accuracy-versus-ε robustness curves.

`model` is any nn.Module mapping inputs x to logits (N, C), e.g. an encoder followed by a decoder. Attacks run
the model in eval mode, restore every submodule's previous mode afterwards, and take gradients with respect to
the input only (torch.autograd.grad), so parameters' .grad fields are never touched.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ATTACKS = ("fgsm", "pgd")
DEFAULT_EPS = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put `module` in eval mode; restore each submodule's own train/eval flag on exit."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def _check(x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    if y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x (N, ...) and y (N,) disagree: shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be ≥ 0 (pixel units in [0, 1]), got {eps}")


def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_x of the summed cross-entropy (nats), same shape as x; no parameter gradients accumulate."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        # Summed, not averaged, so a sample's gradient does not shrink with the batch size (sign is the same).
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """FGSM: clamp(x + eps·sign(∇_x CE), 0, 1), same shape as x (N, ...); eps in [0, 1] pixel units."""
    _check(x, y, eps)
    if eps == 0:
        return x.detach().clone()
    with eval_mode(model):
        grad = _input_gradient(model, x, y)
    return (x.detach() + eps * grad.sign()).clamp(0, 1)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 10,
    alpha: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L∞ PGD on CE inside the eps-ball around x (N, ...) and [0, 1]; step alpha defaults to 2.5·eps/steps."""
    _check(x, y, eps)
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if eps == 0:
        return x.detach().clone()
    if alpha is None:
        alpha = 2.5 * eps / steps
    x0 = x.detach()
    low, high = (x0 - eps).clamp_min(0), (x0 + eps).clamp_max(1)
    if random_start:
        # Drawn on the generator's own device so a CPU generator also serves CUDA inputs.
        device = generator.device if generator is not None else x0.device
        noise = torch.rand(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
        x_adv = torch.max(torch.min(x0 + eps * (2 * noise - 1), high), low)
    else:
        x_adv = x0.clone()
    with eval_mode(model):
        for _ in range(steps):
            grad = _input_gradient(model, x_adv, y)
            x_adv = torch.max(torch.min(x_adv + alpha * grad.sign(), high), low)
    return x_adv


def robustness_curve(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_list: Sequence[float] = DEFAULT_EPS,
    attack: str = "fgsm",
    batch_size: int = 256,
    pgd_steps: int = 10,
    generator: torch.Generator | None = None,
) -> dict[float, float]:
    """Accuracy (fraction in [0, 1]) of model on x (N, ...) with labels y (N,) under `attack`, per eps."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; allowed: {', '.join(ATTACKS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    _check(x, y, min(eps_list, default=0.0))
    n = x.shape[0]
    if n == 0:
        raise ValueError("robustness_curve needs at least one sample")
    curve: dict[float, float] = {}
    with eval_mode(model):
        for eps in eps_list:
            correct = 0
            for start in range(0, n, batch_size):
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                if attack == "pgd":
                    x_adv = pgd(model, xb, yb, eps, steps=pgd_steps, generator=generator)
                else:
                    x_adv = fgsm(model, xb, yb, eps)
                with torch.no_grad():
                    correct += int((model(x_adv).argmax(1) == yb).sum())
            curve[float(eps)] = correct / n
            log.debug("%s eps=%.4g: accuracy %.4f", attack, eps, curve[float(eps)])
    return curve
