"""train.run end to end on digits: the run directory, resume after SIGKILL, failure records, skip when done."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from host_reads import HostReads

from ibbench import results, train
from ibbench.config import RunConfig

SMALL = dict(
    dataset="digits",
    encoder="mlp",
    latent_dim=16,
    batch_size=100,
    eval_every=1,
    probe_width=32,
    k=3,
    beta=0.05,
    lr=1e-3,
    fgsm_eps=[0.0, 4 / 255, 16 / 255],
    pgd_steps=5,  # the whole attack suite on small budgets (test_attacks checks the attacks' strength)
    apgd_steps=10,
    square_queries=50,
    attack_images=1000,  # all of digits' 450 test images: the ε = 0 point is the test accuracy
)

METRIC_FIELDS = {
    "run_id", "epoch", "time", "lr", "train/loss", "h_z", "h_z_given_y", "acc/gmm",
    "infoplane/i_xz", "infoplane/h_y_given_z",
}  # fmt: skip


def small(**changes) -> RunConfig:
    return RunConfig.from_dict({**SMALL, **changes})


@pytest.mark.slow
def test_ib_run_writes_the_whole_run_directory(tmp_path):
    cfg = small(epochs=3, decoders=["gmm", "logreg"])
    summary = train.run(cfg, tmp_path / "r")
    run_dir = tmp_path / "r"
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "DONE"):
        assert (run_dir / name).is_file(), name
    assert RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())) == cfg
    rows = results.read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert METRIC_FIELDS | {"acc/logreg", "train/h_z", "train/h_z_given_y"} <= set(row)
        assert row["run_id"] == results.run_id(cfg)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == "done" and summary["status"] == "done"
    assert on_disk["final"]["acc/gmm"] > 0.6  # chance is 0.1
    assert set(on_disk["robustness"]) == {"gmm", "logreg"}
    curve = on_disk["robustness"]["gmm"]["fgsm"]
    assert len(curve) == 3 and curve["0"] == pytest.approx(on_disk["final"]["acc/gmm"])
    assert curve[f"{16 / 255:.6g}"] <= curve["0"]
    assert {"torch", "python", "ibbench"} <= set(on_disk["versions"]) and on_disk["wall_time"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ce", "ce_dropconnect"])
def test_cross_entropy_baselines_run_the_same_way(tmp_path, objective):
    cfg = small(objective=objective, epochs=2, lr=3e-3)
    summary = train.run(cfg, tmp_path / objective)
    assert (tmp_path / objective / "DONE").exists()
    final = summary["final"]
    assert final["acc/head"] > 0.5 and final["acc/gmm"] > 0.5
    assert {"gmm", "head"} == set(summary["robustness"])
    assert "train/ce" in final


def test_done_run_is_returned_without_training(tmp_path):
    cfg = small(epochs=1)
    first = train.run(cfg, tmp_path / "r")
    stamp = (tmp_path / "r" / "DONE").stat().st_mtime_ns
    again = train.run(cfg, tmp_path / "r")
    assert again == json.loads(json.dumps(first))
    assert (tmp_path / "r" / "DONE").stat().st_mtime_ns == stamp


def test_a_folder_with_another_runs_config_is_refused(tmp_path):
    train.run(small(epochs=1), tmp_path / "r")
    (tmp_path / "r" / "DONE").unlink()
    with pytest.raises(ValueError, match="different run"):
        train.run(small(epochs=1, seed=5), tmp_path / "r")


def test_divergence_is_recorded_as_failed_with_a_reason(tmp_path):
    cfg = small(epochs=3, lr=1e20, noise=False)  # latents overflow float32 within the first epoch
    with pytest.raises(train.TrainingFailed, match="non-finite"):
        train.run(cfg, tmp_path / "r")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["reason"]
    assert not (tmp_path / "r" / "DONE").exists()
    assert results.run_state(tmp_path / "r") == "failed"


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from ibbench import train
    from ibbench.config import RunConfig
    cfg = RunConfig.from_dict({cfg!r})

    def progress(terms):
        if terms["epoch"] == 3:  # epoch 3 trained but not yet checkpointed: die like a preempted job
            os.kill(os.getpid(), signal.SIGKILL)

    train.run(cfg, sys.argv[1], progress=progress)
    """
)


def killed_run(script_text: str, cfg: RunConfig, run_dir):
    """Run cfg in a child process with script_text, which SIGKILLs itself; the run is left incomplete."""
    script = run_dir.parent / "killed.py"
    script.write_text(script_text.format(cfg=cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, str(script), str(run_dir)], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert results.run_state(run_dir) == "incomplete"


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    # On the CPU: bitwise equality is promised there only (cuDNN autotuning and atomic adds vary on GPUs).
    cfg = small(epochs=4, device="cpu", checkpoint_every_s=0)  # every epoch checkpointed
    killed_run(KILLED_RUN, cfg, tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["epoch"] == 2

    train.run(cfg, tmp_path / "resumed")
    train.run(cfg, tmp_path / "straight")
    resumed = results.read_metrics(tmp_path / "resumed")
    straight = results.read_metrics(tmp_path / "straight")
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, straight, strict=True):
        assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}
    rob_a = json.loads((tmp_path / "resumed" / "summary.json").read_text())["robustness"]
    rob_b = json.loads((tmp_path / "straight" / "summary.json").read_text())["robustness"]
    assert rob_a == rob_b


@pytest.mark.slow
def test_a_run_killed_before_its_first_periodic_checkpoint_restarts_and_writes_the_same_rows(tmp_path):
    cfg = small(epochs=4, device="cpu", checkpoint_every_s=3600)
    killed_run(KILLED_RUN, cfg, tmp_path / "resumed")  # SIGKILL in epoch 3: rows 1-2 written, nothing checkpointed
    assert [r["epoch"] for r in results.read_metrics(tmp_path / "resumed")] == [1, 2]
    assert not list((tmp_path / "resumed").glob("checkpoint*.pt"))

    train.run(cfg, tmp_path / "resumed")
    train.run(cfg.replace(checkpoint_every_s=0), tmp_path / "straight")  # the interval is not part of the run
    resumed, straight = (results.read_metrics(tmp_path / name) for name in ("resumed", "straight"))
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, straight, strict=True):
        assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}


@pytest.mark.slow
@pytest.mark.parametrize("every, expected", [(3600, [False, False, False]), (0, [False, True, True])])
def test_checkpoints_follow_the_interval_and_the_last_epoch_always_checkpoints(tmp_path, every, expected):
    run_dir = tmp_path / "r"
    seen = []  # at each epoch's end, before its own checkpoint: is there one from an earlier epoch?
    summary = train.run(small(epochs=3, checkpoint_every_s=every), run_dir,
                        progress=lambda terms: seen.append((run_dir / results.CHECKPOINT).exists()))  # fmt: skip
    assert seen == expected
    assert torch.load(run_dir / results.CHECKPOINT, weights_only=True)["epoch"] == 3
    phases = summary["phase_time"]
    assert set(phases) == set(train.PHASES) and all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= summary["wall_time"]
    assert phases["attack"] >= summary["attack_time"] > 0


@pytest.mark.slow
def test_a_stop_signal_checkpoints_its_epoch_then_reaches_the_previous_handler(tmp_path):
    """SIGUSR2 as SLURM sends it before the time limit, to a handler like submitit's (which would requeue)."""
    run_dir = tmp_path / "r"
    seen = []

    def previous(signum, frame):  # what it finds when the signal reaches it
        state = torch.load(run_dir / results.CHECKPOINT, weights_only=True)
        seen.append((signal.Signals(signum).name, state["epoch"], len(results.read_metrics(run_dir))))

    def progress(terms):
        if terms["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGUSR2)

    original = signal.signal(signal.SIGUSR2, previous)
    try:
        summary = train.run(small(epochs=4, checkpoint_every_s=3600), run_dir, progress=progress)
        assert seen == [("SIGUSR2", 2, 2)]  # after epoch 2's row and checkpoint, once
        assert signal.getsignal(signal.SIGUSR2) is previous  # put back when the run ended
        assert summary["status"] == "done" and summary["epochs_done"] == 4
        assert "SIGUSR2 received: checkpointed epoch 2" in (run_dir / results.RUN_LOG).read_text()
        # A run that fails puts the handlers back too; one in another thread (Ray's trials) leaves them alone.
        with pytest.raises(train.TrainingFailed):
            train.run(small(epochs=2, lr=1e20, noise=False), tmp_path / "failed")
        assert signal.getsignal(signal.SIGUSR2) is previous
        handlers = []
        thread = threading.Thread(target=lambda: handlers.append(
            train.run(small(epochs=1), tmp_path / "thread", progress=lambda t: handlers.append(
                signal.getsignal(signal.SIGUSR2)))["status"]))  # fmt: skip
        thread.start()
        thread.join(timeout=300)
        assert handlers == [previous, "done"]
    finally:
        signal.signal(signal.SIGUSR2, original)


def stopped_in_epoch_3(cfg: RunConfig, run_dir) -> None:
    """Train epochs 1-2 (each checkpointed), then stop in epoch 3 like Ctrl-C."""

    def progress(terms):
        if terms["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, run_dir, progress=progress)
    assert train._load_checkpoint(run_dir)["epoch"] == 2


def close_rows(a: list[dict], b: list[dict], rel: float, acc: float) -> None:
    """Metrics rows equal in their epochs and keys, their values within rel (accuracies within acc)."""
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for row_a, row_b in zip(a, b, strict=True):
        assert set(row_a) == set(row_b)
        for key in set(row_a) - {"time", "run_id", "epoch"}:
            tolerance = {"abs": acc} if "acc/" in key else {"rel": rel, "abs": 1e-6}
            assert row_a[key] == pytest.approx(row_b[key], **tolerance), (row_a["epoch"], key)


@pytest.mark.cuda
def test_a_cuda_run_resumes_with_its_own_device_rng_only(tmp_path):
    """Issue 15.1-2 on a GPU: resume works, Adam's step stays on the CPU, one CUDA RNG state (the run's device),
    and the resumed run computes what an uninterrupted CUDA run computes (not bitwise: atomic adds)."""
    cfg = small(epochs=3, device="cuda", checkpoint_every_s=0)
    stopped_in_epoch_3(cfg, tmp_path / "r")
    state = train._load_checkpoint(tmp_path / "r")
    assert state["rng"]["cuda"].device.type == "cpu" and state["rng"]["cuda"].dtype == torch.uint8
    assert state["optimizer"]["state"][0]["step"].device.type == "cpu"
    assert train.run(cfg, tmp_path / "r")["status"] == "done"
    assert train.run(cfg, tmp_path / "straight")["device"].startswith("cuda")
    close_rows(results.read_metrics(tmp_path / "r"), results.read_metrics(tmp_path / "straight"), 1e-3, 0.01)


@pytest.mark.cuda
def test_a_checkpoint_saved_on_cuda_resumes_on_the_cpu(tmp_path):
    """device is a placement field: a run checkpointed on a GPU node may resume on a CPU-only one."""
    cfg = small(epochs=3, device="cuda", checkpoint_every_s=0)
    stopped_in_epoch_3(cfg, tmp_path / "r")  # epochs 1-2 trained on the GPU
    before = results.read_metrics(tmp_path / "r")
    state = train._load_checkpoint(tmp_path / "r")
    data = train.load_dataset("digits")
    latents = {}
    for device in ("cpu", "cuda"):  # the saved weights compute the same latents on either device
        model = train._build(cfg, data, torch.device(device))
        model.encoder.load_state_dict(state["encoder"])
        model.objective.load_state_dict(state["objective"])
        with torch.no_grad():
            latents[device] = model.latent.eval()(data.test_x[:64].to(device)).cpu()
    torch.testing.assert_close(latents["cuda"], latents["cpu"], rtol=1e-4, atol=1e-5)

    trained = []
    summary = train.run(cfg.replace(device="cpu"), tmp_path / "r", progress=lambda t: trained.append(t["epoch"]))
    assert summary["status"] == "done" and summary["device"] == "cpu" and trained == [3]
    rows = results.read_metrics(tmp_path / "r")
    assert rows[:2] == before and [r["epoch"] for r in rows] == [1, 2, 3]  # the GPU's epochs kept, not redone
    assert "resumed after epoch 2" in (tmp_path / "r" / results.RUN_LOG).read_text()
    # Epoch 3 continued from the GPU's weights, not from a fresh start (the CPU run's own first epoch).
    fresh = train.run(cfg.replace(device="cpu", epochs=1), tmp_path / "fresh")["final"]
    assert rows[2]["train/loss"] < fresh["train/loss"] - 0.3
    assert rows[2]["acc/gmm"] >= rows[1]["acc/gmm"] - 0.05


def test_report_is_called_at_each_eval_epoch(tmp_path):
    seen = []
    train.run(small(epochs=4, eval_every=2), tmp_path / "r", report=seen.append)
    assert [r["epoch"] for r in seen] == [2, 4]
    assert all("acc/gmm" in r for r in seen)


PREEMPTED_IN_ROBUSTNESS = textwrap.dedent(
    """
    import os, signal, sys
    from ibbench import train
    from ibbench.config import RunConfig
    cfg = RunConfig.from_dict({cfg!r})

    def preempted(*args, **kwargs):  # the last epoch is checkpointed; die while the attacks run
        os.kill(os.getpid(), signal.SIGKILL)

    train._robustness = preempted
    train.run(cfg, sys.argv[1])
    """
)


@pytest.mark.slow
def test_a_run_preempted_during_the_robustness_phase_finishes_without_training_again(tmp_path):
    cfg = small(epochs=2)
    killed_run(PREEMPTED_IN_ROBUSTNESS, cfg, tmp_path / "resumed")
    assert [r["epoch"] for r in results.read_metrics(tmp_path / "resumed")] == [1, 2]

    epochs_trained = []
    train.run(cfg, tmp_path / "resumed", progress=epochs_trained.append)
    assert epochs_trained == []  # nothing trained again: only the robustness phase was left
    train.run(cfg, tmp_path / "straight")
    resumed, straight = (results.read_metrics(tmp_path / name) for name in ("resumed", "straight"))
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(resumed, straight, strict=True):
        assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}
    summaries = [results.read_summary(tmp_path / name) for name in ("resumed", "straight")]
    assert summaries[0]["status"] == "done" and summaries[0]["robustness"] == summaries[1]["robustness"]


def test_an_error_that_is_not_a_training_failure_is_recorded_with_its_reason(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "information_plane", out_of_memory)  # the first evaluation runs out of memory
    with pytest.raises(train.TrainingFailed, match="OutOfMemoryError"):
        train.run(small(epochs=2), tmp_path / "r")
    summary = results.read_summary(tmp_path / "r")
    assert summary["status"] == "failed" and results.run_state(tmp_path / "r") == "failed"
    assert summary["reason"].startswith("OutOfMemoryError: CUDA out of memory")


@pytest.mark.parametrize("objective, beta", [("vib", 1e-3), ("nlib", 0.1)])
def test_the_other_ib_objectives_run_the_same_way(tmp_path, objective, beta):
    cfg = small(objective=objective, beta=beta, epochs=2, lr=3e-3)
    assert cfg.noise is False  # their noise is their own
    summary = train.run(cfg, tmp_path / objective)
    final = summary["final"]
    assert final["acc/head"] > 0.5 and final["acc/gmm"] > 0.5
    assert {"gmm", "head"} == set(summary["robustness"])
    assert final["train/i_xz_bound"] > 0  # the objective's own bound on I(X;Z), next to the k-NN one
    assert math.isfinite(final["infoplane/i_xz"])


@pytest.mark.slow
def test_vib_without_its_kl_term_learns_like_cross_entropy(tmp_path):
    """β = 0: CE with a stochastic layer; on digits its accuracy is within a few points of plain CE."""
    accuracy = {}
    for objective in ("ce", "vib"):
        cfg = small(objective=objective, beta=0.0, epochs=4, lr=3e-3, noise=False, decoders=["gmm"])
        accuracy[objective] = train.run(cfg, tmp_path / objective)["final"]["acc/head"]
    assert accuracy["ce"] > 0.85 and abs(accuracy["vib"] - accuracy["ce"]) <= 0.05, accuracy


@pytest.mark.parametrize("objective, most", [("ib", 2), ("ce", 0), ("vib", 0), ("nlib", 0)])
def test_a_training_step_reads_the_device_at_most_twice(objective, most):
    """Host reads per step, counted on CPU as the difference between a 3-step and a 1-step epoch (what an epoch
    reads once, such as the loss means and the health check, cancels out)."""
    from ibbench.data import load_dataset

    cfg = small(objective=objective, beta=0.001 if objective == "vib" else 0.05, batch_size=100)
    data = load_dataset("digits")
    device = torch.device("cpu")
    model = train._build(cfg, data, device)
    optimizer = torch.optim.Adam([*model.encoder.parameters(), *model.objective.parameters()], lr=cfg.lr)
    loader = train.make_loader(cfg, data, device)
    batches = list(loader)
    reads = {}
    for steps in (1, 3):
        with HostReads() as counter:
            train._train_epoch(cfg, model, batches[:steps], optimizer, device, 1)
        reads[steps] = counter.count
    assert (reads[3] - reads[1]) / 2 <= most, reads


@pytest.mark.cuda
@pytest.mark.parametrize("objective, most", [("ib", 2), ("ce", 0)])
def test_a_cuda_training_step_synchronises_at_most_twice(objective, most):
    """Issue 15.7 on a GPU: torch's sync debug mode flags every wait of the host for the device (blocking copies
    included), on CIFAR-shaped batches drawn and augmented by the run's own loader; per step, as the difference
    between a 3-step and a 1-step epoch (what an epoch does once cancels out), after a warm-up epoch."""
    import itertools
    import warnings

    from ibbench.data import make_synthetic

    cfg = RunConfig.from_dict(dict(dataset="synthetic", encoder="cnn", latent_dim=16, objective=objective, k=1,
                                   batch_size=50, augment=True, device="cuda"))  # fmt: skip
    data = make_synthetic(n_train=200, n_test=20)
    device = torch.device("cuda")
    model = train._build(cfg, data, device)
    optimizer = torch.optim.Adam([*model.encoder.parameters(), *model.objective.parameters()], lr=cfg.lr)
    loader = train.make_loader(cfg, data, device)
    train._train_epoch(cfg, model, itertools.islice(iter(loader), 2), optimizer, device, 0)  # warm-up
    syncs = {}
    for steps in (1, 3):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train._train_epoch(cfg, model, itertools.islice(iter(loader), steps), optimizer, device, 1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs[steps] = sum("synchroniz" in str(w.message) for w in caught)
    assert syncs[1] > 0  # the epoch's one read of its health check, at least: the counter counts
    assert (syncs[3] - syncs[1]) / 2 <= most, syncs


def test_float32_precision_is_set_both_ways_and_recorded(tmp_path):
    matmul = torch.backends.cuda.matmul
    before = (matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        # The flags are process-wide: a reused Ray worker must not keep an earlier run's TF32.
        assert train.set_precision(small(tf32=True), torch.device("cuda")) == {"amp": "off", "float32": "tf32"}
        assert (matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
        assert train.set_precision(small(tf32=False), torch.device("cuda"))["float32"] == "ieee"
        assert (matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
    summary = train.run(small(epochs=1, tf32=True, device="cpu"), tmp_path / "r")
    assert summary["precision"] == {"amp": "off", "float32": "ieee"}  # no TF32 on a CPU, whatever was asked


class Saturated(torch.nn.Module):
    """A fitted decoder's logits × 1000: the float32 softmax saturates (the issue's deliberately masked model)."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z):
        return 1000 * self.decoder(z)


def test_summary_records_the_suite_the_worst_case_and_how_decoders_were_fitted(tmp_path):
    cfg = small(epochs=2, decoders=["gmm", "logreg"], pgd_steps=3, attack_images=100, fgsm_eps=[0.0, 0.1, 0.25])
    summary = train.run(cfg, tmp_path / "r")
    settings = summary["attack_settings"]
    assert settings["attacks"] == list(cfg.attacks) and settings["pgd_steps"] == 3
    assert settings["images"] == 100 and settings["test_images"] == 450 and settings["latent_noise"] == "off"
    assert {"apgd_steps", "apgd_restarts", "pgd_restarts", "pgd_step_size", "square_queries", "seed"} <= set(settings)
    assert summary["decoder_fit"]["gmm"].startswith("train latents with the zero-entropy noise")
    assert summary["decoder_fit"]["logreg"] == "noise-free train latents"
    for decoder in ("gmm", "logreg"):
        curves = summary["robustness"][decoder]
        assert set(curves) == set(cfg.attacks) | {"worst"}
        for eps in curves["worst"]:
            assert curves["worst"][eps] <= min(curves[a][eps] for a in cfg.attacks)
        masking = summary["masking"][decoder]
        assert {"zero_grad_share", "square_gap", "worst_at_max_eps", "unreliable", "reasons"} <= set(masking)
        assert masking["worst_at_max_eps"] == curves["worst"]["0.25"]
    # On digits IB + noise, the GMM fitted on noisy latents keeps its cross-entropy gradients (< 1 % zero).
    assert summary["masking"]["gmm"]["zero_grad_share"] < 0.01


def test_a_saturated_decoder_is_flagged_in_the_summary(tmp_path, monkeypatch):
    fit = train.fit_decoders
    monkeypatch.setattr(train, "fit_decoders", lambda *a, **k: {n: Saturated(d) for n, d in fit(*a, **k).items()})
    cfg = small(objective="ce", noise=False, epochs=2, lr=3e-3, fgsm_eps=[0.0, 0.3], attack_images=200)
    summary = train.run(cfg, tmp_path / "r")
    gmm, curves = summary["masking"]["gmm"], summary["robustness"]["gmm"]
    assert gmm["zero_grad_share"] >= 0.5 and gmm["ce_blind"]
    assert curves["fgsm"]["0.3"] >= 0.5  # the paper's FGSM is blind to it ...
    assert min(curves["fgsm_margin"]["0.3"], curves["apgd_dlr"]["0.3"]) <= 0.05  # ... the margin attacks are not
    assert curves["worst"]["0.3"] <= 0.05 and not gmm["unreliable"]
    assert summary["decoder_fit"]["head"].startswith("the objective's own head")


def test_eot_attacks_the_noisy_model(tmp_path):
    cfg = small(epochs=1, eot_draws=4, attacks=["fgsm", "pgd_margin"], fgsm_eps=[0.0, 0.1], attack_images=100)
    summary = train.run(cfg, tmp_path / "r")
    assert summary["attack_settings"]["eot_draws"] == 4
    assert summary["attack_settings"]["latent_noise"] == "EOT over 4 draws"
    assert set(summary["robustness"]["gmm"]) == {"fgsm", "pgd_margin", "worst"}


@pytest.mark.slow
def test_evaluation_settings_do_not_change_the_training_trajectory(tmp_path):
    """Evaluation has its own random stream: eval_every, the decoders or probe_width leave train/loss as it was."""
    base = dict(epochs=4, device="cpu", fgsm_eps=[0.0])
    losses = {}
    for name, changes in {
        "a": dict(eval_every=1, probe_width=32),
        "b": dict(eval_every=2, probe_width=8, decoders=["gmm", "logreg"]),
    }.items():
        train.run(small(**base, **changes), tmp_path / name)
        losses[name] = {r["epoch"]: r["train/loss"] for r in results.read_metrics(tmp_path / name)}
    assert set(losses["b"]) == {2, 4} and losses["b"] == {e: losses["a"][e] for e in (2, 4)}


def test_the_cross_fitted_h_y_given_z_is_at_least_the_in_sample_one_on_a_digits_run(tmp_path):
    train.run(small(epochs=2), tmp_path / "r")
    for row in results.read_metrics(tmp_path / "r"):
        assert row["infoplane/h_y_given_z"] >= row["infoplane/h_y_given_z_in_sample"]
        assert 0 < row["val_h_y_given_z"] < math.log(10) and 0 <= row["val_acc/gmm"] <= 1
