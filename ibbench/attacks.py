"""L∞ attacks on [0, 1] pixels, the per-image worst case over a suite of them, and gradient-masking diagnostics.

`model` is any nn.Module mapping inputs x to logits (N, C), e.g. an encoder followed by a decoder. Attacks run
the model in eval mode, restore every submodule's previous mode afterwards, and take gradients with respect to
the input only (torch.autograd.grad), so parameters' .grad fields are never touched. Pure tensor functions:
nothing here reads or writes files.

The suite (ATTACKS): the paper's FGSM on the cross-entropy (`fgsm`, kept for reproduction); FGSM and PGD on the
logit margin (`fgsm_margin`, `pgd_margin`; PGD on the cross-entropy as `pgd`), which a saturated softmax cannot
blind; and AutoAttack's APGD-CE, APGD-DLR and the gradient-free Square attack from torchattacks. An image counts
as robust at ε only if it is classified correctly clean and under every attack of the suite (`worst_case`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import math
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

PAPER_ATTACK = "fgsm"  # the paper's attack: one signed-gradient step on the cross-entropy
WORST = "worst"  # the key of the per-image worst case in every curve mapping
# name -> loss it ascends; "ce" attacks go blind where the float32 softmax saturates (zero input gradient)
ATTACK_LOSSES = {
    "fgsm": "ce",
    "pgd": "ce",
    "fgsm_margin": "margin",
    "pgd_margin": "margin",
    "apgd_ce": "ce",
    "apgd_dlr": "dlr",
    "square": "margin",
}
ATTACKS = tuple(ATTACK_LOSSES)
ATTACK_LABELS = {
    "fgsm": "FGSM-CE (paper)",
    "fgsm_margin": "FGSM-margin",
    "pgd": "PGD-CE",
    "pgd_margin": "PGD-margin",
    "apgd_ce": "APGD-CE",
    "apgd_dlr": "APGD-DLR",
    "square": "Square",
    WORST: "worst case",
}
GRADIENT_FREE = ("square",)
DEFAULT_ATTACKS = ("fgsm", "fgsm_margin", "pgd_margin", "apgd_ce", "apgd_dlr", "square")
DEFAULT_EPS = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)

# Masking diagnostics (Carlini et al. 2019, "On Evaluating Adversarial Robustness", sec. 5):
CE_BLIND_SHARE = 0.05  # a larger share of zero cross-entropy input gradients makes the CE attacks blind
SQUARE_GAP = 0.02  # Square beating every gradient attack by more than this (accuracy) means masked gradients
BREAK_EPS = 0.2  # at this L∞ radius (51/255) a working attack leaves any model not trained adversarially near 0 %
BREAK_ACCURACY = 0.05  # ... "near 0 %": a worst case above this there looks masked
# ... unless the model is at chance: a (near-)constant classifier cannot be flipped, its class keeps its share
CHANCE_FACTOR = 2.0  # clean accuracy ≤ this × a constant classifier's (the largest class share): chance level


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


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample logit margin max_{j≠y} z_j − z_y (N,): > 0 exactly when the image is misclassified.

    The Carlini–Wagner loss: differences of logits, so its gradient survives a softmax saturated in float32.
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf)
    return others.amax(1) - true


def attack_loss(loss: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample loss (N,) an attack ascends: "ce" (nats) or "margin"."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        return margin_loss(logits, y)
    raise ValueError(f"unknown loss {loss!r}; allowed: ce, margin")


def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """∇_x of the summed per-sample loss, same shape as x; no parameter gradients accumulate."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        # Summed, not averaged, so a sample's gradient does not shrink with the batch size (sign is the same).
        value = attack_loss(loss, model(x), y).sum()
        (grad,) = torch.autograd.grad(value, x)
    return grad


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, loss: str = "ce") -> torch.Tensor:
    """FGSM: clamp(x + eps·sign(∇_x loss), 0, 1), same shape as x (N, ...); eps in [0, 1] pixel units."""
    _check(x, y, eps)
    if eps == 0:
        return x.detach().clone()
    with eval_mode(model):
        grad = _input_gradient(model, x, y, loss)
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
    loss: str = "ce",
    restarts: int = 1,
) -> torch.Tensor:
    """L∞ PGD on `loss` inside the eps-ball around x (N, ...) and [0, 1]; step alpha defaults to 2.5·eps/steps.

    `steps` gradient steps (one forward each) per restart; with restarts > 1 each image keeps the first restart
    that misclassifies it (one extra forward per restart decides), later restarts start at random points.
    """
    _check(x, y, eps)
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be ≥ 1, got {steps} and {restarts}")
    if eps == 0:
        return x.detach().clone()
    if alpha is None:
        alpha = 2.5 * eps / steps
    x0 = x.detach()
    low, high = (x0 - eps).clamp_min(0), (x0 + eps).clamp_max(1)
    best, fooled = x0.clone(), torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
    with eval_mode(model):
        for restart in range(restarts):
            if random_start or restart > 0:
                # Drawn on the generator's own device so a CPU generator also serves CUDA inputs.
                device = generator.device if generator is not None else x0.device
                noise = torch.rand(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
                x_adv = torch.max(torch.min(x0 + eps * (2 * noise - 1), high), low)
            else:
                x_adv = x0.clone()
            for _ in range(steps):
                grad = _input_gradient(model, x_adv, y, loss)
                x_adv = torch.max(torch.min(x_adv + alpha * grad.sign(), high), low)
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                wrong = model(x_adv).argmax(1) != y
            take = wrong & ~fooled
            best[take] = x_adv[take]
            fooled |= wrong
        best[~fooled] = x_adv[~fooled]
    return best


@contextlib.contextmanager
def _torchattacks_context(model: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """What torchattacks needs wrapped: its attacks reseed the *global* torch (and CUDA) RNG with their own seed,
    which would silently change the caller's random stream (the training loop's, a resumed run's), so the
    global state is forked and restored; they print instead of logging (only cli prints here); and their
    mode handling sets a model that was in train mode back with model.train(), losing mixed per-module modes,
    so the model is held in eval mode by eval_mode, which restores each submodule's own flag.
    """
    devices = [x.device.index or 0] if x.is_cuda else []
    with eval_mode(model), torch.random.fork_rng(devices=devices), contextlib.redirect_stdout(io.StringIO()):
        yield


_TORCHATTACKS = "_ibbench_torchattacks"  # torchattacks' files, loaded under a name of our own


def _torchattacks_class(module: str, name: str) -> type:
    """torchattacks' attack class `name` from torchattacks/attacks/<module>.py, without the package's __init__.

    That __init__ imports all of its ~40 attacks, and TIFGSM's scipy.stats costs ~1.3 s of CPU in every process
    that attacks (each sweep trial). The files are loaded under a private package name, so a `torchattacks` that
    the user imports is the whole package, untouched; where it is imported already, its own class is used.
    """
    if "torchattacks" in sys.modules:
        return getattr(sys.modules["torchattacks"], name)
    if _TORCHATTACKS not in sys.modules:
        spec = importlib.util.find_spec("torchattacks")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("torchattacks is not installed (a dependency of ibbench: pip install torchattacks)")
        roots = list(spec.submodule_search_locations)
        for package, paths in ((_TORCHATTACKS, roots), (f"{_TORCHATTACKS}.attacks", [f"{r}/attacks" for r in roots])):
            stub = types.ModuleType(package)
            stub.__path__ = paths  # a package whose submodules are found, its __init__ never run
            sys.modules[package] = stub
    try:
        return getattr(importlib.import_module(f"{_TORCHATTACKS}.attacks.{module}"), name)
    except (ImportError, AttributeError):  # a release that moved its files: the whole package, as it is meant
        import torchattacks

        return getattr(torchattacks, name)


def _check_image(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4 or min(x.shape[2:]) < 2:
        raise ValueError(f"{name} needs images (N, C, H, W) with H, W ≥ 2, got shape {tuple(x.shape)}")


def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    loss: str = "ce",
    steps: int = 100,
    restarts: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """AutoAttack's APGD (torchattacks.APGD, L∞) on "ce" or "dlr"; x (N, C, H, W) in [0, 1] -> same shape.

    Images it cannot fool come back unchanged. Seeded by `seed`; the caller's global RNG state is untouched.
    """
    _check(x, y, eps)
    _check_image(x, "apgd")
    if eps == 0 or x.shape[0] == 0:
        return x.detach().clone()
    with _torchattacks_context(model, x):
        attack = _torchattacks_class("apgd", "APGD")(
            model, norm="Linf", eps=eps, steps=steps, n_restarts=restarts, seed=seed, loss=loss, eot_iter=1
        )
        attack.set_device(x.device)
        return attack(x.detach(), y).detach()


def square(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    queries: int = 5000,
    restarts: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """Square attack (torchattacks.Square, L∞, margin loss): gradient-free random search with `queries` queries."""
    _check(x, y, eps)
    _check_image(x, "square")
    if eps == 0 or x.shape[0] == 0:
        return x.detach().clone()
    with _torchattacks_context(model, x), torch.no_grad():
        attack = _torchattacks_class("square", "Square")(
            model, norm="Linf", eps=eps, n_queries=queries, n_restarts=restarts, loss="margin", seed=seed
        )
        attack.set_device(x.device)
        return attack(x.detach(), y).detach()


@dataclass(frozen=True)
class AttackSettings:
    """Which attacks run and how hard: the RunConfig attack fields, as the attack functions take them."""

    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    pgd_steps: int = 20  # gradient steps of each PGD restart
    pgd_restarts: int = 1
    pgd_step_size: float = 2.5  # PGD step α = pgd_step_size · ε / pgd_steps
    apgd_steps: int = 100
    apgd_restarts: int = 1
    square_queries: int = 5000
    seed: int = 0  # random starts (PGD, APGD) and Square's search
    batch_size: int = 500  # images per attack call

    def __post_init__(self) -> None:
        unknown = [a for a in self.attacks if a not in ATTACK_LOSSES]
        if unknown or not self.attacks:
            raise ValueError(f"unknown attack(s) {unknown or '(none given)'}; allowed: {', '.join(ATTACKS)}")
        counts = (self.pgd_steps, self.pgd_restarts, self.apgd_steps, self.apgd_restarts, self.square_queries)
        if min(counts) < 1 or self.batch_size < 1 or not self.pgd_step_size > 0:
            raise ValueError(f"attack steps, restarts, queries and batch size must be ≥ 1 and the step > 0: {self}")


def run_attack(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    settings: AttackSettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial inputs (same shape as x) from attack `name` (one of ATTACKS) at radius eps."""
    s = settings
    if name in ("fgsm", "fgsm_margin"):
        return fgsm(model, x, y, eps, loss=ATTACK_LOSSES[name])
    if name in ("pgd", "pgd_margin"):
        alpha = s.pgd_step_size * eps / s.pgd_steps
        return pgd(model, x, y, eps, s.pgd_steps, alpha, True, generator, ATTACK_LOSSES[name], s.pgd_restarts)
    if name in ("apgd_ce", "apgd_dlr"):
        return apgd(model, x, y, eps, ATTACK_LOSSES[name], s.apgd_steps, s.apgd_restarts, s.seed)
    if name == "square":
        return square(model, x, y, eps, s.square_queries, 1, s.seed)
    raise ValueError(f"unknown attack {name!r}; allowed: {', '.join(ATTACKS)}")


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


def attack_suite(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_list: Sequence[float],
    settings: AttackSettings | None = None,
) -> dict[str, dict[float, torch.Tensor]]:
    """Per-image robustness {attack: {eps: bool (N,)}} of model on x (N, ...) with labels y (N,), and "worst".

    An image is robust to an attack at eps when it is classified correctly both clean and on the attack's
    output; only clean-correct images are attacked. Radii are attacked from the smallest up, and an image an
    attack broke at a smaller radius counts as broken at the larger ones without a rerun: its adversarial example
    lies inside the larger ball too (the curves are monotone, and the large radii cost little). "worst" is the
    per-image AND over every attack.
    """
    settings = settings or AttackSettings()
    _check(x, y, min(eps_list, default=0.0))
    if x.shape[0] == 0:
        raise ValueError("attack_suite needs at least one sample")
    bs = settings.batch_size
    out: dict[str, dict[float, torch.Tensor]] = {name: {} for name in settings.attacks}
    with eval_mode(model):
        clean = _predict(model, x, bs) == y
        for name in settings.attacks:
            robust = clean.clone()
            for eps in sorted(float(e) for e in eps_list):
                target = robust.nonzero().squeeze(1)
                if eps > 0 and target.numel():
                    robust = robust.clone()
                    # One generator per (attack, ε): each curve point is reproducible on its own.
                    generator = torch.Generator(device=x.device).manual_seed(settings.seed)
                    for start in range(0, target.numel(), bs):
                        idx = target[start : start + bs]
                        x_adv = run_attack(name, model, x[idx], y[idx], eps, settings, generator)
                        if not bool(((x_adv - x[idx]).abs() <= eps + 1e-6).all()):
                            raise RuntimeError(f"{name} left the ε-ball at ε={eps:g}")  # never trust, verify
                        robust[idx] = _predict(model, x_adv, bs) == y[idx]
                out[name][eps] = robust
                log.debug("%s ε=%.4g: accuracy %.4f", name, eps, float(robust.float().mean()))
        out = {name: {float(e): out[name][float(e)] for e in eps_list} for name in out}  # the caller's order
    out[WORST] = worst_case(out)
    return out


def worst_case(per_image: Mapping[str, Mapping[float, torch.Tensor] | torch.Tensor]) -> dict[float, torch.Tensor]:
    """Per eps, the images (bool (N,)) that every attack leaves correct: the AND over attacks, not a min of rates.

    per_image maps attack -> {eps: bool (N,)} (attack_suite's layout; a "worst" entry is ignored), or attack ->
    bool (N,) for a single radius, in which case the result is that one mask.
    """
    attacks = [name for name in per_image if name != WORST]
    if not attacks:
        raise ValueError("worst_case needs at least one attack")
    if all(isinstance(per_image[name], torch.Tensor) for name in attacks):
        return torch.stack([per_image[name] for name in attacks]).bool().all(0)
    eps_values = per_image[attacks[0]].keys()
    worst = {}
    for eps in eps_values:
        masks = [per_image[name][eps] for name in attacks]
        worst[eps] = torch.stack(masks).bool().all(0)
    return worst


def accuracy_curves(per_image: Mapping[str, Mapping[float, torch.Tensor]]) -> dict[str, dict[float, float]]:
    """{attack: {eps: fraction of robust images}} from attack_suite's per-image masks."""
    return {name: {eps: float(mask.float().mean()) for eps, mask in curve.items()} for name, curve in per_image.items()}


def zero_gradient_share(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction in [0, 1] of images whose cross-entropy input gradient is exactly zero (a saturated softmax)."""
    _check(x, y, 0.0)
    zero = 0
    with eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            grad = _input_gradient(model, x[start : start + batch_size], y[start : start + batch_size], "ce")
            zero += int((grad.flatten(1) == 0).all(1).sum())
    return zero / max(x.shape[0], 1)


def masking_diagnostics(
    curves: Mapping[str, Mapping[float, float]], zero_grad_share: float, chance: float | None = None
) -> dict:
    """Signs that the suite's gradients were masked, from accuracy curves (with "worst") and the zero-gradient share.

    Returns zero_grad_share; ce_blind (CE attacks, the paper's FGSM among them, see no gradient on more than
    CE_BLIND_SHARE of the images); square_gap (the most, over ε, that Square's accuracy lies below every gradient
    attack's; None without Square) and its ε; max_eps and worst_at_max_eps; clean (accuracy at ε = 0, if
    measured), chance (a constant classifier's accuracy: the largest class share, if given) and chance_level
    (clean ≤ CHANCE_FACTOR × chance: nothing to attack); unreliable with the reasons: Square stronger than every
    gradient attack by more than SQUARE_GAP, or a worst case above BREAK_ACCURACY at a radius ≥ BREAK_EPS for a
    model above chance level.
    """
    worst = curves[WORST]
    max_eps = max(worst)
    clean = worst.get(0.0)
    chance_level = chance is not None and clean is not None and clean <= CHANCE_FACTOR * chance
    gradient = [a for a in curves if a != WORST and a not in GRADIENT_FREE]
    square_gap, square_eps = None, None
    if "square" in curves and gradient:
        for eps in worst:
            if eps == 0:
                continue
            gap = min(curves[a][eps] for a in gradient) - curves["square"][eps]
            if square_gap is None or gap > square_gap:
                square_gap, square_eps = gap, eps
    reasons = []
    if square_gap is not None and square_gap > SQUARE_GAP:
        reasons.append(
            f"Square (gradient-free) beats every gradient attack by {100 * square_gap:.1f} points at "
            f"ε={square_eps:.4g}: gradients are masked"
        )
    if max_eps >= BREAK_EPS and worst[max_eps] > BREAK_ACCURACY and not chance_level:
        reasons.append(
            f"worst-case accuracy {100 * worst[max_eps]:.1f} % at ε={max_eps:.4g}, where a working attack leaves "
            f"≤ {100 * BREAK_ACCURACY:.0f} %"
        )
    return {
        "zero_grad_share": zero_grad_share,
        "ce_blind": zero_grad_share > CE_BLIND_SHARE,
        "square_gap": square_gap,
        "square_gap_eps": square_eps,
        "max_eps": max_eps,
        "worst_at_max_eps": worst[max_eps],
        "clean": clean,
        "chance": chance,
        "chance_level": chance_level,
        "unreliable": bool(reasons),
        "reasons": reasons,
    }


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
    """Accuracy (fraction in [0, 1]) of model on x (N, ...) with labels y (N,) under one `attack`, per eps.

    Counts an image correct when the attacked input is classified correctly (the paper's FGSM curve); for the
    suite's clean-and-attacked robust accuracy and the worst case use attack_suite.
    """
    if attack not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack {attack!r}; allowed: {', '.join(ATTACKS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    _check(x, y, min(eps_list, default=0.0))
    n = x.shape[0]
    if n == 0:
        raise ValueError("robustness_curve needs at least one sample")
    settings = AttackSettings(attacks=(attack,), pgd_steps=pgd_steps, batch_size=batch_size)
    curve: dict[float, float] = {}
    with eval_mode(model):
        for eps in eps_list:
            correct = 0
            for start in range(0, n, batch_size):
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                x_adv = run_attack(attack, model, xb, yb, eps, settings, generator)
                with torch.no_grad():
                    correct += int((model(x_adv).argmax(1) == yb).sum())
            curve[float(eps)] = correct / n
            log.debug("%s eps=%.4g: accuracy %.4f", attack, eps, curve[float(eps)])
    return curve
