"""The training loop every objective, launcher and terminal shares: `run(cfg, run_dir, report=None)`."""

from __future__ import annotations

import errno
import logging
import math
import platform
import random
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ibbench import results
from ibbench.attacks import AttackSettings
from ibbench.config import ConfigError, RunConfig
from ibbench.data import Dataset, DeviceLoader, augment_cifar, load_dataset, with_validation
from ibbench.errors import TrainingFailed
from ibbench.estimators import add_zero_entropy_noise, conditional_knn_entropy, knn_entropy
from ibbench.evaluation import (
    attack_settings_record,
    decoder_accuracy,
    encode,
    fit_decoders,
    information_plane,
    robustness_suite,
    stratified_subset,
)
from ibbench.metrics import HEAD
from ibbench.models import make_encoder
from ibbench.objectives import Objective, ObjectiveSettings, make_objective

log = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any]], None]

LR_FACTOR = math.sqrt(0.1)  # the paper multiplies the LR by √0.1 on a plateau
CHECKPOINT_KEYS = ("epoch", "encoder", "objective", "optimizer", "scheduler", "loader_rng", "loader_device_rng", "rng")
# Decoders that model p(z|y) are fitted on latents with the noise the encoder was trained with (the paper's
# model of Z|Y, its appendix A.2): on noise-free compressed latents their class log-likelihoods differ by
# hundreds of nats, the float32 softmax saturates and the cross-entropy's input gradient vanishes.
NOISY_FIT_DECODERS = ("gmm",)
# SLURM sends SIGTERM on scancel and preemption, and SIGUSR2 before the time limit (submitit's --signal=USR2@90,
# whose handler then requeues the job): both make the epoch loop checkpoint before they take their course.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR2") if hasattr(signal, name))
PHASES = ("train", "evaluate", "attack", "checkpoint")  # summary.json's phase_time: wall seconds of each


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


def set_precision(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """Make the run's float32 arithmetic what cfg says and return what summary.json records of it.

    Set on every run, both ways: the flags are process-wide, and a Ray worker reused for the next trial must not
    keep an earlier run's TF32. Without this, convolutions on Ampere+ GPUs use TF32 even with amp off.
    """
    mode = "tf32" if cfg.tf32 else "ieee"
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch ≥ 2.9; the legacy flags raise once this API has been used
        matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    cuda = device.type == "cuda"
    precision: dict[str, Any] = {"amp": cfg.amp if cuda else "off", "float32": mode if cuda else "ieee"}
    if cuda and cfg.amp == "bf16":
        precision["bf16_native"] = torch.cuda.is_bf16_supported(including_emulation=False)
        if not precision["bf16_native"]:
            # warnings shows this once per process and place, not once per run of a long sweep.
            warnings.warn(f"amp: bf16 on {torch.cuda.get_device_name(device)}, which has no native bf16: it is "
                          "emulated (slow); use amp: off on this GPU", RuntimeWarning, stacklevel=2)  # fmt: skip
    return precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain lists (what weights_only loading accepts); on CUDA the
    run's own device only, since the resuming process may see fewer GPUs than this one."""
    version, key, gauss = random.getstate()
    name, np_key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(key), gauss],
        "numpy": [name, np_key.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore _rng_state's result; states must be CPU tensors (torch.load to CPU), whatever the run's device."""
    version, key, gauss = state["python"]
    random.setstate((version, tuple(key), gauss))
    name, np_key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(np_key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One pass over the loader; returns the mean of each loss term; raises TrainingFailed on a non-finite loss.

    generator: the training stream's device generator for the objective's noise (the loader's own by default).

    Nothing in a step waits for the device: whether the latents and the loss were finite is kept on the device per
    step and read once, at the end of the epoch (a diverged step poisons the weights, so the rest of the epoch is
    wasted, but the epoch is neither checkpointed nor reported). The objective's own estimates may sync (the k-NN
    search's precision check: two per ib step).
    """
    model.encoder.train()
    model.objective.train()
    if generator is None:
        generator = getattr(loader, "device_generator", None)
    use_amp = cfg.amp == "bf16" and device.type == "cuda"
    sums: dict[str, torch.Tensor] = {}
    health: list[torch.Tensor] = []  # per step: (latents finite, loss finite, loss)
    batches = 0
    for xb, yb in loader:
        with torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext():
            h = model.encoder(xb)
        h = h.float()  # the estimator and the loss stay in float32
        terms = model.objective(h, yb, generator)  # the objective draws its latent (and any noise) from h
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
    """The splits on the training device, moved there once per run (CIFAR-10's train split is 600 MB); val is
    carved from the training data (data.with_validation) and is what a run selects on."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


def _eval_seed(seed: int, epoch: int) -> int:
    """The evaluation stream of one eval epoch: a function of the run's seed and the epoch only, so an evaluation
    is the same whichever epochs were evaluated before it, and a resumed run evaluates as an uninterrupted one."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % 2**63


def _evaluate(
    cfg: RunConfig, model: _Model, data: _Splits, epoch: int = 0
) -> tuple[dict[str, float], dict[str, nn.Module]]:
    """Metrics of one eval epoch and the fitted decoders (keyed by name, the objective's head as "head").

    Evaluation draws only from its own stream (probe and decoder initialisation, noise, splits), seeded per eval
    epoch: the global RNG is forked around it and generators of its own are passed down, so neither eval_every,
    the decoders nor probe_width can change the training trajectory.
    """
    device = data.train_x.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(_eval_seed(cfg.seed, epoch))  # what decoders draw from the global RNG (resfc's init)
        return _evaluate_in_stream(cfg, model, data, _eval_seed(cfg.seed, epoch))


def _evaluate_in_stream(
    cfg: RunConfig, model: _Model, data: _Splits, seed: int
) -> tuple[dict[str, float], dict[str, nn.Module]]:
    metrics: dict[str, float] = {}
    noise = torch.Generator(device=data.train_x.device).manual_seed(seed)
    # Decoders see the deterministic latents (the GMM the noisy ones, below); the entropies see latents with the
    # zero-entropy noise, which makes H[Z] ≥ 0 and I(X; Z+ε) finite (runs trained without noise are measured the
    # same way, and their noise-free H[Z] is reported beside it).
    z_train = encode(model.latent, data.train_x)
    z_val = encode(model.latent, data.val_x)
    z_test = encode(model.latent, data.test_x)
    validation = (z_val, data.val_y)
    noisy_fit = [d for d in cfg.decoders if cfg.noise and d in NOISY_FIT_DECODERS]
    decoders: dict[str, nn.Module] = {}
    if noisy_fit:
        z_noisy_train = add_zero_entropy_noise(z_train, generator=noise)
        decoders.update(fit_decoders(noisy_fit, z_noisy_train, data.train_y, data.num_classes, validation))
    plain = [d for d in cfg.decoders if d not in noisy_fit]
    decoders.update(fit_decoders(plain, z_train, data.train_y, data.num_classes, validation))
    decoders = {name: decoders[name] for name in cfg.decoders}  # in the configured order
    if model.objective.has_head:
        decoders[HEAD] = _HeadDecoder(model.objective)
    for name, decoder in decoders.items():
        acc = decoder_accuracy(decoder, z_test, data.test_y)
        metrics[f"acc/{name}"] = acc
        metrics[f"test_acc/{name}"] = acc
        metrics[f"train_acc/{name}"] = decoder_accuracy(decoder, z_train, data.train_y)
        metrics[f"val_acc/{name}"] = decoder_accuracy(decoder, z_val, data.val_y)
    z_noisy = add_zero_entropy_noise(z_test, generator=noise)
    z_noisy_val = add_zero_entropy_noise(z_val, generator=noise)
    metrics["h_z"] = float(knn_entropy(z_noisy, cfg.k))
    metrics["h_z_given_y"] = float(conditional_knn_entropy(z_noisy, data.test_y, cfg.k))
    plane = information_plane(
        z_noisy, data.test_y, data.num_classes, cfg.k, width=cfg.probe_width, folds=cfg.probe_folds,
        generator=torch.Generator().manual_seed(seed), validation=(z_noisy_val, data.val_y),
    )  # fmt: skip
    metrics["infoplane/i_xz"] = plane["i_xz"]
    metrics["infoplane/h_y_given_z"] = plane["h_y_given_z"]
    metrics["infoplane/h_y_given_z_in_sample"] = plane["h_y_given_z_in_sample"]
    metrics["infoplane/h_z_noise_free"] = float(knn_entropy(z_test, cfg.k))
    metrics["val_h_y_given_z"] = plane["val_h_y_given_z"]
    return metrics, decoders


class _HeadDecoder(nn.Module):
    """The objective's own head as a decoder (eval-mode logits), so CE baselines are attacked the same way."""

    def __init__(self, objective: Objective):
        super().__init__()
        self.objective = objective

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.objective.logits(z)


def decoder_fits(cfg: RunConfig, decoders: Mapping[str, nn.Module]) -> dict[str, str]:
    """Which latents each decoder was fitted on, as summary.json records it (accuracy is always noise-free test)."""
    fits = {}
    for name in decoders:
        if name == HEAD:
            fits[name] = "the objective's own head, trained with the encoder"
        elif cfg.noise and name in NOISY_FIT_DECODERS:
            fits[name] = "train latents with the zero-entropy noise the encoder was trained with"
        else:
            fits[name] = "noise-free train latents"
    return fits


def attack_settings(cfg: RunConfig) -> AttackSettings:
    """The run's attack suite and budgets."""
    return AttackSettings(
        attacks=cfg.attacks,
        pgd_steps=cfg.pgd_steps,
        pgd_restarts=cfg.pgd_restarts,
        pgd_step_size=cfg.pgd_step_size,
        apgd_steps=cfg.apgd_steps,
        apgd_restarts=cfg.apgd_restarts,
        square_queries=cfg.square_queries,
        seed=cfg.attack_seed,
    )


def _robustness(cfg: RunConfig, model: _Model, decoders: Mapping[str, nn.Module], data: _Splits) -> dict:
    """summary.json's robustness block: {decoder: {attack: {eps: accuracy}}} with "worst", masking, settings.

    On a fixed class-stratified subset of the test set, model in eval mode, ε in [0, 1] pixel units; the latent
    noise off unless cfg.eot_draws > 0.
    """
    index = stratified_subset(data.test_y, cfg.attack_images, cfg.attack_seed)
    x, y = data.test_x[index], data.test_y[index]
    settings = attack_settings(cfg)
    started = time.perf_counter()
    suite = robustness_suite(model.latent, decoders, x, y, cfg.fgsm_eps, settings, cfg.eot_draws)
    curves = {
        name: {attack: {_eps_key(eps): acc for eps, acc in curve.items()} for attack, curve in per_attack.items()}
        for name, per_attack in suite["robustness"].items()
    }
    return {
        "robustness": curves,
        "masking": suite["masking"],
        "attack_settings": attack_settings_record(settings, cfg.eot_draws, len(index), len(data.test_y)),
        "decoder_fit": decoder_fits(cfg, decoders),
        "attack_time": time.perf_counter() - started,
    }


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


def _save_checkpoint(
    run_dir: Path, model: _Model, optimizer, scheduler, loader: DeviceLoader, epoch: int, device: torch.device, **extra
):
    """checkpoint.pt via a unique fsynced temporary; the one it replaces becomes checkpoint.prev.pt (see
    results.atomic_write: a full disk leaves the old checkpoints and no temporary behind)."""
    state = {
        "epoch": epoch,
        "encoder": model.encoder.state_dict(),
        "objective": model.objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loader_rng": loader.generator.get_state(),
        "loader_device_rng": loader.device_generator.get_state(),
        "rng": _rng_state(device),
        **extra,
    }
    results.atomic_write(
        run_dir / results.CHECKPOINT, lambda f: torch.save(state, f), previous=run_dir / results.PREVIOUS_CHECKPOINT
    )


def _load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint, or None (start from scratch).

    Loaded to the CPU with weights_only=True: no code in a shared run folder runs as whoever resumes it, and RNG
    states stay CPU tensors (load_state_dict moves weights and optimiser state to the model's device). A file
    that cannot be read (empty or torn after a crash, or holding pickled objects) is said in run.log, removed,
    and the previous checkpoint tried.
    """
    for path in results.checkpoints(run_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing = [key for key in CHECKPOINT_KEYS if key not in state]
            if missing:
                raise KeyError(f"no {', '.join(missing)}")
        except Exception as exc:  # EOFError, RuntimeError (torn zip), UnpicklingError (refused object), KeyError
            problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            message = f"{path.name} is unreadable ({type(exc).__name__}: {problem}); removed it"
            log.warning("%s: %s", run_dir, message)
            results.append_log(run_dir, message)
            path.unlink(missing_ok=True)
            continue
        if path.name != results.CHECKPOINT:
            results.append_log(run_dir, f"resuming from the previous checkpoint, {path.name} (epoch {state['epoch']})")
        return state
    return None


class _DeferredSignals:
    """While installed (the epoch loop, in the main thread), SIGTERM and SIGUSR2 only mark themselves pending: the
    loop checkpoints at the next epoch boundary, then hand_on() gives them to the handlers they had before
    (submitit's requeues the job, SIG_DFL terminates), so the run loses nothing and its launcher behaves as it
    would without ibbench. A second signal before that boundary is handed on at once: an epoch longer than
    SLURM's grace (SIGTERM at the limit, SIGKILL after KillWait) must not cost the job its requeue.

    Off the main thread (Ray's trial threads) signal.signal raises: nothing is deferred there.
    """

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            handler = signal.getsignal(sig)
            if handler is not None:  # None: a handler set outside Python, which could not be put back
                self.previous[sig] = handler
                signal.signal(sig, self._defer)

    def _defer(self, signum: int, frame: Any) -> None:
        self.pending.append(signum)
        if len(self.pending) > 1:
            self.hand_on()

    def _restore(self) -> list[int]:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        pending, self.pending = list(dict.fromkeys(self.pending)), []
        return pending

    def hand_on(self) -> None:
        """Deliver the pending signals to the previous handlers (which may end the process); defer again after."""
        for sig in self._restore():
            signal.raise_signal(sig)
        for sig in self.previous:
            signal.signal(sig, self._defer)

    def close(self) -> None:
        """Put the previous handlers back for good and deliver any signal still pending; idempotent."""
        pending = self._restore()
        self.previous = {}
        for sig in pending:
            signal.raise_signal(sig)


@contextmanager
def _timed(phase_time: dict[str, float], phase: str):
    """Add the block's wall seconds to phase_time[phase] (each phase ends in a host read, so the device is done)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phase_time[phase] += time.perf_counter() - start


def _disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind exc, if any (torch.save reports a failed write as a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _failure_reason(exc: BaseException, run_dir: Path) -> str:
    full = _disk_full(exc)
    if full is not None:
        what = "no space left on device" if full.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{what}: could not write into {run_dir}; free space, then run again to resume from its checkpoint"
    return str(exc) if isinstance(exc, TrainingFailed) else f"{type(exc).__name__}: {exc}"


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
    precision = set_precision(cfg, device)
    seed_everything(cfg.seed)
    # Data first: a missing dataset is a ConfigError for the caller, before anything is written.
    # The validation split is carved out of the training data: the loader never trains on it.
    data = with_validation(load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.seed), cfg.val_fraction)
    loader = make_loader(cfg, data, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    with results.run_lock(run_dir) as lock:
        if results.run_state(run_dir) == "done":  # finished by whoever held the lock before us
            return results.read_summary(run_dir) or {}
        try:
            results.write_config(run_dir, cfg)
        except OSError as exc:
            if _disk_full(exc) is None:
                raise
            raise TrainingFailed(_failure_reason(exc, run_dir)) from exc
        placement = {"hostname": socket.gethostname(), "gpu_ids": list(gpu_ids or [])}  # where it ran
        return _train(cfg, run_dir, data, device, loader, rid, started_at, report, progress, lock, precision,
                      placement)  # fmt: skip


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
    lock: results.RunLock,
    precision: dict[str, Any],
    placement: dict[str, Any],
) -> dict[str, Any]:
    """The body of run(), under the run directory's lock."""
    model = _build(cfg, data, device)
    # The loader holds the train split on the device already; eval reuses it (un-augmented) and the test split.
    test_x = data.test_x.contiguous(memory_format=torch.channels_last) if loader.channels_last else data.test_x
    splits = _Splits(loader.x, loader.y, data.val_x.to(device), data.val_y.to(device), test_x.to(device),
                     data.test_y.to(device), data.info.num_classes)  # fmt: skip
    params = list(model.encoder.parameters()) + list(model.objective.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=LR_FACTOR, patience=cfg.lr_patience
    )
    start_epoch, wall_before = 1, 0.0
    t0 = time.perf_counter()
    decoders: dict[str, nn.Module] = {}
    last_metrics: dict[str, Any] = {}
    epochs_done = 0  # epochs trained, evaluated and checkpointed: what a resume keeps
    phase_time = dict.fromkeys(PHASES, 0.0)
    signals = _DeferredSignals()
    try:
        leftovers = results.remove_temporaries(run_dir)  # from a writer killed mid-write (we hold the lock)
        if leftovers:
            results.append_log(run_dir, f"removed temporaries a killed writer left: {', '.join(leftovers)}")
        state = _load_checkpoint(run_dir)
        if state is not None:
            model.encoder.load_state_dict(state["encoder"])
            model.objective.load_state_dict(state["objective"])
            optimizer.load_state_dict(state["optimizer"])  # casts moments to the parameters' device; step stays CPU
            scheduler.load_state_dict(state["scheduler"])
            loader.generator.set_state(state["loader_rng"])
            loader.device_generator.set_state(state["loader_device_rng"])
            _set_rng_state(state["rng"], device)
            epochs_done, wall_before = state["epoch"], state.get("wall_time", 0.0)
            phase_time.update(state.get("phase_time", {}))
            start_epoch = epochs_done + 1
            results.truncate_metrics(run_dir, epochs_done)
            log.info("run %s resumes after epoch %d", rid, epochs_done)
            results.append_log(run_dir, f"resumed after epoch {epochs_done} on {platform.node()}")
        else:
            if (run_dir / results.METRICS).exists():
                results.truncate_metrics(run_dir, 0)  # rows from a start that never reached a checkpoint
            results.append_log(run_dir, f"started from epoch 1 on {platform.node()}")
        signals.install()
        saved_at = time.monotonic()
        for epoch in range(start_epoch, cfg.epochs + 1):
            with _timed(phase_time, "train"):
                terms = _train_epoch(cfg, model, loader, optimizer, device, epoch)
            scheduler.step(terms["loss"])
            lr = optimizer.param_groups[0]["lr"]
            if progress is not None:
                progress({"epoch": epoch, "epochs": cfg.epochs, "lr": lr, **terms})
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                with _timed(phase_time, "evaluate"):
                    metrics, decoders = _evaluate(cfg, model, splits, epoch)
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
            if lock.lost:  # frozen past the lock's staleness: another process owns the run now; write nothing
                raise results.RunLocked(f"{run_dir}: the run lock was taken over while this process was stalled")
            # Periodic checkpoints (a whole model each) bound what a SIGKILL loses; the last epoch and a stop signal
            # always checkpoint. Rows past the checkpoint's epoch are dropped on resume and written again.
            stopping = [signal.Signals(sig).name for sig in signals.pending]
            if stopping or epoch == cfg.epochs or time.monotonic() - saved_at >= cfg.checkpoint_every_s:
                with _timed(phase_time, "checkpoint"):
                    _save_checkpoint(
                        run_dir, model, optimizer, scheduler, loader, epoch, device,
                        wall_time=wall_before + time.perf_counter() - t0, phase_time=dict(phase_time),
                    )  # fmt: skip
                saved_at, epochs_done = time.monotonic(), epoch
            if stopping:
                results.append_log(run_dir, f"{', '.join(stopping)} received: checkpointed epoch {epoch}, passed it on")
                signals.hand_on()
        signals.close()  # the last epoch is checkpointed: from here a signal takes its course at once
        if not decoders:  # resumed after the last epoch's checkpoint: refit the decoders for the robustness curves
            with _timed(phase_time, "evaluate"):
                metrics, decoders = _evaluate(cfg, model, splits, epochs_done)
            last_metrics = (results.read_metrics(run_dir) or [{"run_id": rid, "epoch": epochs_done, **metrics}])[-1]
        with _timed(phase_time, "attack"):
            curves = _robustness(cfg, model, decoders, splits)
    except results.RunLocked:
        raise  # another process owns the run: its files are not ours to mark
    except KeyboardInterrupt:
        results.append_log(run_dir, f"interrupted after epoch {epochs_done}; resumes from its checkpoint")
        raise
    except Exception as exc:
        reason = _failure_reason(exc, run_dir)
        try:
            results.write_summary(
                run_dir,
                {
                    "status": "failed",
                    "reason": reason,
                    "run_id": rid,
                    "epochs_done": epochs_done,
                    "wall_time": wall_before + time.perf_counter() - t0,
                    "started": started_at,
                    "device": str(device),
                    **placement,
                    "versions": _versions(),
                    "git_commit": _git_commit(),
                },
            )
            results.append_log(run_dir, f"failed: {reason}")
        except OSError as write_error:  # a disk too full even for summary.json: the reason is raised all the same
            log.error("run %s: could not record its failure: %s", rid, write_error)
        log.info("run %s failed: %s", rid, reason)  # the caller reports it (raised below, and in summary.json)
        if isinstance(exc, TrainingFailed):
            raise
        raise TrainingFailed(reason) from exc
    finally:
        signals.close()  # on every way out: the previous handlers back, a pending signal delivered

    summary = {
        "status": "done",
        "run_id": rid,
        "config": cfg.to_dict(),
        "epochs_done": cfg.epochs,
        "final": last_metrics,
        **curves,
        "wall_time": wall_before + time.perf_counter() - t0,
        "phase_time": phase_time,
        "started": started_at,
        "finished": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "device": str(device),
        "precision": precision,
        **placement,
        "versions": _versions(),
        "git_commit": _git_commit(),
    }
    results.write_summary(run_dir, summary)
    results.mark_done(run_dir)
    (run_dir / results.PREVIOUS_CHECKPOINT).unlink(missing_ok=True)  # a done run resumes nothing: free its space
    results.append_log(run_dir, "done")
    return summary
