"""Share of a run spent attacking: the quickstart's runs, and a ResNet18 run of the paper's shape on CPU.

    python benchmarks/bench_attacks.py [--quick] [--threads T] [--images M]

1. Quickstart: two of sweeps/quickstart.yaml's runs (IB β''=0.05 with noise, and the CE baseline, which attacks
   two decoders: the GMM and its own head) trained by train.run at the sweep's settings; the share is
   summary.json's attack_time over the run's wall time, both measured in the same process.
   Times are this process's CPU seconds (one torch thread), which other processes on a shared machine do not
   stretch; wall seconds are printed beside them.
2. ResNet18 on CIFAR-shaped synthetic data (3×32×32, 10 classes), at the RunConfig defaults (attack suite and
   budgets, the paper's ε): a few training steps through train._train_epoch give seconds per training image;
   the suite run on M test images by evaluation.robustness_suite (GMM and, for CE, the head) gives seconds per
   attacked image. Extrapolated to the paper's run (150 epochs of 50 000 images, attack_images = 1000), that is
   the share of a CIFAR run spent attacking. Attack cost depends on how fast images break (Square stops on a
   fooled image); an untrained model breaks quickly, so the bound with every image surviving every query is
   printed too, from the measured forward and forward+backward costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_run import PhaseClock  # this folder is on sys.path when a benchmark runs as a script

from ibbench import train
from ibbench.attacks import AttackSettings
from ibbench.config import RunConfig, load_sweep
from ibbench.data import make_synthetic
from ibbench.evaluation import EncoderDecoder, encode, fit_decoders, robustness_suite

TARGET = 0.30  # the target: at most 30 % of a run spent attacking
QUICKSTART = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"
PAPER_EPOCHS, PAPER_TRAIN = 150, 50_000


def quickstart_share(quick: bool) -> list[float]:
    """Run two quickstart configurations; print and return each run's attack share (of CPU time).

    CPU time of this process (one torch thread) is the headline: on a shared machine other processes stretch
    wall time unevenly between the training and attacking phases; the wall-time share is printed beside it.
    """
    runs = load_sweep(QUICKSTART).runs
    chosen = [
        next(r for r in runs if r.objective == "ib" and r.noise and r.beta == 0.05 and r.seed == 0),
        next(r for r in runs if r.objective == "ce" and r.seed == 0),
    ]
    shares = []
    for cfg in chosen:
        if quick:
            cfg = cfg.replace(epochs=2, eval_every=2, fgsm_eps=[0.0, 0.1], attack_images=60)
        with tempfile.TemporaryDirectory() as tmp, PhaseClock({"attack": "_robustness"}, torch.device("cpu")) as clock:
            wall, cpu = time.perf_counter(), time.process_time()
            summary = train.run(cfg, Path(tmp) / "run")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        attack_wall, attack_cpu, _ = clock.times["attack"]
        shares.append(attack_cpu / cpu)
        print(
            f"  quickstart {cfg.objective} (β''={cfg.beta}, noise={cfg.noise}, decoders "
            f"{list(summary['robustness'])}): run {cpu:.2f} CPU s ({wall:.2f} s wall), attacking {attack_cpu:.2f} "
            f"CPU s ({attack_wall:.2f} s wall; wall share {100 * attack_wall / wall:.1f} %)"
        )
        print(f"share attacking quickstart {cfg.objective}: {100 * shares[-1]:.1f} % (target ≤ {100 * TARGET:.0f} %)")
    return shares


def _per_image(fn, images: int, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return statistics.median(times) / images


def resnet_share(images: int, steps: int, quick: bool) -> None:
    """Seconds per training image and per attacked image of a ResNet18; the share of a paper-sized run."""
    batch = 20 if quick else 130
    base = RunConfig.from_dict(
        dict(dataset="synthetic", encoder="resnet18", latent_dim=256, batch_size=batch, k=1, device="cpu")
    )
    if quick:
        base = base.replace(apgd_steps=5, square_queries=20, pgd_steps=3, fgsm_eps=[0.0, 8 / 255])
    data = make_synthetic(shape=(3, 32, 32), n_train=batch if quick else max(4 * batch, 200),
                          n_test=max(images, 20), seed=0)  # fmt: skip
    splits_x, splits_y = data.train_x, data.train_y
    settings = train.attack_settings(base)
    print(
        f"\nResNet18, synthetic 3×32×32, batch {batch}; attacks {', '.join(settings.attacks)}; PGD {settings.pgd_steps}"
        f", APGD {settings.apgd_steps} steps, Square {settings.square_queries} queries; ε {list(base.fgsm_eps)}"
    )
    for objective in ("ib", "ce"):
        cfg = base.replace(objective=objective, noise=objective == "ib")
        train.seed_everything(0)
        model = train._build(cfg, data, torch.device("cpu"))
        params = list(model.encoder.parameters()) + list(model.objective.parameters())
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
        loader = train.make_loader(cfg, data, torch.device("cpu"))
        train._train_epoch(cfg, model, loader, optimizer, torch.device("cpu"), 1)  # warm-up and a little training
        per_step = []
        for epoch in range(steps):
            started = time.process_time()
            train._train_epoch(cfg, model, loader, optimizer, torch.device("cpu"), epoch + 2)
            per_step.append((time.process_time() - started) / len(splits_y))
        train_image = statistics.median(per_step)
        decoders = dict(fit_decoders(["gmm"], encode(model.encoder, splits_x), splits_y, 10))
        if model.objective.has_head:
            decoders[train.HEAD] = train._HeadDecoder(model.objective)
        x, y = data.test_x[:images], data.test_y[:images]
        started = time.process_time()
        suite = robustness_suite(model.encoder, decoders, x, y, cfg.fgsm_eps, settings)
        attack_image = (time.process_time() - started) / images
        # Bound: every image survives to the last step and query of every attack at every radius.
        net = EncoderDecoder(model.encoder, decoders["gmm"]).eval()

        def fwd_bwd(x=x, net=net, y=y) -> None:
            xr = x.clone().requires_grad_(True)
            torch.autograd.grad(torch.nn.functional.cross_entropy(net(xr), y), xr)

        def fwd(x=x, net=net) -> None:
            with torch.no_grad():
                net(x)

        repeats = 1 if quick else 3
        t_fb, t_f = _per_image(fwd_bwd, images, repeats), _per_image(fwd, images, repeats)
        radii = sum(1 for e in cfg.fgsm_eps if e > 0)
        n_fb = _gradient_steps(settings)
        n_f = settings.square_queries + len(settings.attacks) + 1
        bound_image = len(decoders) * radii * (n_fb * t_fb + n_f * t_f)
        train_run = PAPER_EPOCHS * PAPER_TRAIN * train_image
        for label, per_image in (("measured", attack_image), ("bound", bound_image)):
            attack_run = cfg.attack_images * per_image
            share = attack_run / (train_run + attack_run)
            print(
                f"  {objective} ({len(decoders)} decoder{'s' if len(decoders) > 1 else ''}), {label}: "
                f"{1e3 * per_image:.0f} ms per attacked image, {1e3 * train_image:.1f} ms per training image; "
                f"paper run: training {train_run / 3600:.1f} h, attacking {attack_run / 3600:.2f} h"
            )
            print(
                f"share attacking resnet18 {objective} ({label}): {100 * share:.1f} % (target ≤ {100 * TARGET:.0f} %)"
            )
        worst = suite["robustness"]["gmm"]["worst"]
        print(f"  (worst-case accuracy of this barely trained model: {', '.join(f'{v:.2f}' for v in worst.values())})")


def _gradient_steps(s: AttackSettings) -> int:
    """Forward+backward passes per image and radius of the gradient attacks, if no image breaks early."""
    steps = {
        "fgsm": 1,
        "fgsm_margin": 1,
        "pgd": s.pgd_steps * s.pgd_restarts,
        "pgd_margin": s.pgd_steps * s.pgd_restarts,
    }
    steps |= {"apgd_ce": (s.apgd_steps + 1) * s.apgd_restarts, "apgd_dlr": (s.apgd_steps + 1) * s.apgd_restarts}
    return sum(steps.get(a, 0) for a in s.attacks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a quickstart trial)")
    parser.add_argument("--images", type=int, help="ResNet18 test images attacked (default 8; 1 with --quick)")
    parser.add_argument("--steps", type=int, help="ResNet18 timed training epochs (default 3; 1 with --quick)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s)" + (", --quick" if args.quick else ""))
    quickstart_share(args.quick)
    resnet_share(args.images or (1 if args.quick else 8), args.steps or (1 if args.quick else 3), args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
