"""The training loop every objective, launcher and terminal shares: `run(cfg, run_dir, report=None)`."""

from __future__ import annotations

import logging
import math
import platform
import random
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ibbench import results
from ibbench.config import ConfigError, RunConfig
from ibbench.data import Dataset, DeviceLoader, augment_cifar, load_dataset
from ibbench.estimators import add_zero_entropy_noise, conditional_knn_entropy, knn_entropy
from ibbench.evaluation import decoder_accuracy, encode, fit_decoders, information_plane, robustness
from ibbench.models import make_encoder
from ibbench.objectives import Objective, ObjectiveSettings, make_objective

log = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any]], None]

LR_FACTOR = math.sqrt(0.1)  # the paper multiplies the LR by √0.1 on a plateau
HEAD = "head"  # the decoder name under which objectives with a head (ce, ce_dropconnect) report it


class TrainingFailed(RuntimeError):
    """The run stopped without a result (e.g. a non-finite loss); summary.json holds the reason."""


class LatentEncoder(nn.Module):
    """x (N, ...) -> the objective's deterministic latent (N, latent_dim): what decoders, attacks and the
    information plane see (the encoder's output itself, or VIB's mean)."""

    def __init__(self, encoder: nn.Module, objective: Objective):
        super().__init__()
        self.encoder = encoder
        self.objective = objective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.objective.latent(self.encoder(x))


@dataclass
class _Model:
    """What one run trains: the encoder and the objective (which owns any head), and their evaluation latent."""

    encoder: nn.Module
    objective: Objective

    @property
    def latent(self) -> LatentEncoder:
        return LatentEncoder(self.encoder, self.objective)


def pick_device(name: str) -> torch.device:
    """auto: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("<config>", "device", "cuda was asked for, but torch sees no CUDA device", "auto, cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("ibbench", "torch", "torchvision", "numpy", "ray", "optuna"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _eps_key(eps: float) -> str:
    return f"{eps:.6g}"


def _build(cfg: RunConfig, data: Dataset, device: torch.device) -> _Model:
    info = data.info
    settings = ObjectiveSettings(
        latent_dim=cfg.latent_dim,
        num_classes=info.num_classes,
        beta=cfg.beta,
        k=cfg.k,
        dropconnect=cfg.dropconnect,
        dropconnect_per_example=cfg.dropconnect_per_example,
        noise=bool(cfg.noise),
        vib_samples=cfg.vib_samples,
        nlib_noise_var=cfg.nlib_noise_var,
        nlib_learn_noise=cfg.nlib_learn_noise,
        nlib_squared=cfg.nlib_squared,
    )
    objective = make_objective(cfg.objective, settings)
    width = objective.encoder_width(cfg.latent_dim)
    encoder = make_encoder(cfg.encoder, info.input_shape, width, info.mean, info.std)
    if cfg.channels_last and device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    return _Model(encoder.to(device), objective.to(device))


def _train_epoch(
    cfg: RunConfig,
    model: _Model,
    loader: DeviceLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
) -> dict[str, float]:
    """One pass over the loader; returns the mean of each loss term; raises TrainingFailed on a non-finite loss.

    Nothing in a step waits for the device: whether the latents and the loss were finite is kept on the device per
    step and read once, at the end of the epoch (a diverged step poisons the weights, so the rest of the epoch is
    wasted, but the epoch is neither checkpointed nor reported). The objective's own estimates may sync (the k-NN
    search's precision check: two per ib step).
    """
    model.encoder.train()
    model.objective.train()
    use_amp = cfg.amp == "bf16" and device.type == "cuda"
    sums: dict[str, torch.Tensor] = {}
    health: list[torch.Tensor] = []  # per step: (latents finite, loss finite, loss)
    batches = 0
    for xb, yb in loader:
        with torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext():
            h = model.encoder(xb)
        h = h.float()  # the estimator and the loss stay in float32
        terms = model.objective(h, yb)  # the objective draws its latent (and any noise) from h
        loss = terms["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        health.append(torch.stack([torch.isfinite(h).all().float(), torch.isfinite(loss).float(), loss.detach()]))
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value.detach()
        batches += 1
    if batches:
        health_all = torch.stack(health).cpu()  # the epoch's one read of the device
        bad = (health_all[:, :2] < 1).any(1).nonzero()
        if len(bad):
            first = int(bad[0, 0])
            if health_all[first, 0] < 1:
                raise TrainingFailed(f"non-finite latents in epoch {epoch}, batch {first + 1}: the encoder diverged")
            raise TrainingFailed(f"non-finite loss ({float(health_all[first, 2])}) in epoch {epoch}, batch {first + 1}")
    return {key: float(total) / batches for key, total in sums.items()}


@dataclass(frozen=True)
class _Splits:
    """Both splits on the training device, moved there once per run (CIFAR-10's train split is 600 MB)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


def _evaluate(cfg: RunConfig, model: _Model, data: _Splits) -> tuple[dict[str, float], dict[str, nn.Module]]:
    """Metrics of one eval epoch and the fitted decoders (keyed by name, the objective's head as "head")."""
    metrics: dict[str, float] = {}
    # Latents for decoders without noise (the deterministic encoder), for the entropies with the noise that
    # makes H[Z] ≥ 0 and I[X;Z] = H[Z] meaningful (runs trained without noise are measured the same way).
    z_train = encode(model.latent, data.train_x)
    z_test = encode(model.latent, data.test_x)
    decoders: dict[str, nn.Module] = dict(fit_decoders(cfg.decoders, z_train, data.train_y, data.num_classes))
    if model.objective.has_head:
        decoders[HEAD] = _HeadDecoder(model.objective)
    y_test, y_train = data.test_y, data.train_y
    for name, decoder in decoders.items():
        acc = decoder_accuracy(decoder, z_test, y_test)
        metrics[f"acc/{name}"] = acc
        metrics[f"test_acc/{name}"] = acc
        metrics[f"train_acc/{name}"] = decoder_accuracy(decoder, z_train, y_train)
    z_noisy = add_zero_entropy_noise(z_test)
    metrics["h_z"] = float(knn_entropy(z_noisy, cfg.k))
    metrics["h_z_given_y"] = float(conditional_knn_entropy(z_noisy, y_test, cfg.k))
    plane = information_plane(z_noisy, y_test, data.num_classes, cfg.k, width=cfg.probe_width)
    metrics["infoplane/i_xz"] = plane["i_xz"]
    metrics["infoplane/h_y_given_z"] = plane["h_y_given_z"]
    return metrics, decoders


class _HeadDecoder(nn.Module):
    """The objective's own head as a decoder (eval-mode logits), so CE baselines are attacked the same way."""

    def __init__(self, objective: Objective):
        super().__init__()
        self.objective = objective

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.objective.logits(z)


def _robustness(cfg: RunConfig, model: _Model, decoders: Mapping[str, nn.Module], data: _Splits) -> dict:
    """{decoder: {attack: {eps: accuracy}}} on the test set, noise off, ε in [0, 1] pixel units."""
    attacks = ["fgsm"] + (["pgd"] if cfg.pgd_steps > 0 else [])
    x, y = data.test_x, data.test_y
    curves: dict[str, dict[str, dict[str, float]]] = {}
    for name, decoder in decoders.items():
        curves[name] = {}
        for attack in attacks:
            curve = robustness(model.latent, decoder, x, y, cfg.fgsm_eps, attack=attack)
            curves[name][attack] = {_eps_key(eps): acc for eps, acc in curve.items()}
    return curves


def make_loader(cfg: RunConfig, data: Dataset, device: torch.device) -> DeviceLoader:
    """The training loader of a run: class-balanced batches on the device, CIFAR augmentation on 32×32 inputs."""
    augment = augment_cifar if cfg.augment and data.info.input_shape[1:] == (32, 32) else None
    try:
        return DeviceLoader(
            data.train_x,
            data.train_y,
            cfg.batch_size,
            device=device,
            k=cfg.batch_k,
            augment=augment,
            seed=cfg.seed,
            channels_last=cfg.channels_last and device.type == "cuda",
        )
    except ValueError as exc:  # e.g. a batch larger than the training set
        raise ConfigError("<config>", "batch_size", str(exc)) from None


def _save_checkpoint(run_dir: Path, model: _Model, optimizer, scheduler, loader: DeviceLoader, epoch: int, **extra):
    state = {
        "epoch": epoch,
        "encoder": model.encoder.state_dict(),
        "objective": model.objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loader_rng": loader.generator.get_state(),
        "rng": _rng_state(),
        **extra,
    }
    path = run_dir / results.CHECKPOINT
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a reader sees the old or the new checkpoint, never half of one


def run(
    cfg: RunConfig,
    run_dir: str | Path,
    report: Reporter | None = None,
    progress: Reporter | None = None,
    gpu_ids: list[str] | None = None,
) -> dict[str, Any]:
    """Train cfg into run_dir and return summary.json's content; resumes from checkpoint.pt, skips when DONE.

    report(metrics) is called after each eval epoch (Ray Tune passes tune.report); progress(terms) after every
    epoch (the CLI's progress bar). gpu_ids: the GPUs the launcher assigned (recorded in the summary). A
    non-finite loss or any error marks the run failed and re-raises.
    """
    run_dir = Path(run_dir)
    if results.run_state(run_dir) == "done":
        summary = results.read_summary(run_dir) or {}
        log.info("run %s is done already; not training", run_dir.name)
        return summary
    rid = results.run_id(cfg)
    started_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    device = pick_device(cfg.device)
    if device.type == "cuda":
        # Fixed input shapes all run long: let cuDNN pick its fastest convolutions once (bitwise GPU
        # reproducibility is not promised anyway; CPU runs stay deterministic).
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.seed)
    # Data first: a missing dataset is a ConfigError for the caller, before anything is written.
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.seed)
    loader = make_loader(cfg, data, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    with results.run_lock(run_dir):
        if results.run_state(run_dir) == "done":  # finished by whoever held the lock before us
            return results.read_summary(run_dir) or {}
        results.write_config(run_dir, cfg)
        placement = {"hostname": socket.gethostname(), "gpu_ids": list(gpu_ids or [])}  # where it ran
        return _train(cfg, run_dir, data, device, loader, rid, started_at, report, progress, placement)


def _train(
    cfg: RunConfig,
    run_dir: Path,
    data: Dataset,
    device: torch.device,
    loader: DeviceLoader,
    rid: str,
    started_at: str,
    report: Reporter | None,
    progress: Reporter | None,
    placement: dict[str, Any],
) -> dict[str, Any]:
    """The body of run(), under the run directory's lock."""
    model = _build(cfg, data, device)
    # The loader holds the train split on the device already; eval reuses it (un-augmented) and the test split.
    splits = _Splits(loader.x, loader.y, data.test_x.to(device), data.test_y.to(device), data.info.num_classes)
    params = list(model.encoder.parameters()) + list(model.objective.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=LR_FACTOR, patience=cfg.lr_patience
    )
    start_epoch, wall_before = 1, 0.0
    checkpoint_path = run_dir / results.CHECKPOINT
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.encoder.load_state_dict(state["encoder"])
        model.objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.generator.set_state(state["loader_rng"])
        _set_rng_state(state["rng"])
        start_epoch, wall_before = state["epoch"] + 1, state.get("wall_time", 0.0)
        results.truncate_metrics(run_dir, state["epoch"])
        log.info("run %s resumes after epoch %d", rid, state["epoch"])
    elif (run_dir / results.METRICS).exists():
        results.truncate_metrics(run_dir, 0)  # rows from a start that never reached a checkpoint

    t0 = time.perf_counter()
    decoders: dict[str, nn.Module] = {}
    last_metrics: dict[str, Any] = {}
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            terms = _train_epoch(cfg, model, loader, optimizer, device, epoch)
            scheduler.step(terms["loss"])
            lr = optimizer.param_groups[0]["lr"]
            if progress is not None:
                progress({"epoch": epoch, "epochs": cfg.epochs, "lr": lr, **terms})
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                metrics, decoders = _evaluate(cfg, model, splits)
                row = {
                    "run_id": rid,
                    "epoch": epoch,
                    "time": wall_before + time.perf_counter() - t0,
                    "lr": lr,
                    **{f"train/{k}": v for k, v in terms.items()},
                    **metrics,
                }
                results.append_metrics(run_dir, row)
                last_metrics = row
                if report is not None:
                    report(dict(row))
            _save_checkpoint(
                run_dir, model, optimizer, scheduler, loader, epoch, wall_time=wall_before + time.perf_counter() - t0
            )
        if not decoders:  # resumed after the last epoch's checkpoint: refit the decoders for the robustness curves
            metrics, decoders = _evaluate(cfg, model, splits)
            last_metrics = (results.read_metrics(run_dir) or [{"run_id": rid, "epoch": epoch, **metrics}])[-1]
        curves = _robustness(cfg, model, decoders, splits)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, TrainingFailed) else f"{type(exc).__name__}: {exc}"
        results.write_summary(
            run_dir,
            {
                "status": "failed",
                "reason": reason,
                "run_id": rid,
                "epochs_done": epoch - 1 if isinstance(exc, TrainingFailed) else epoch,
                "wall_time": wall_before + time.perf_counter() - t0,
                "started": started_at,
                "device": str(device),
                **placement,
                "versions": _versions(),
                "git_commit": _git_commit(),
            },
        )
        log.error("run %s failed: %s", rid, reason)
        if isinstance(exc, TrainingFailed):
            raise
        raise TrainingFailed(reason) from exc

    summary = {
        "status": "done",
        "run_id": rid,
        "config": cfg.to_dict(),
        "epochs_done": cfg.epochs,
        "final": last_metrics,
        "robustness": curves,
        "wall_time": wall_before + time.perf_counter() - t0,
        "started": started_at,
        "finished": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "device": str(device),
        **placement,
        "versions": _versions(),
        "git_commit": _git_commit(),
    }
    results.write_summary(run_dir, summary)
    results.mark_done(run_dir)
    return summary
