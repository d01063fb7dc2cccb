"""Sweeps: a SweepSpec expanded into RunConfigs (grid) or searched with Optuna, driven through Ray Tune.

Run directories are the state: a run with DONE is never trained again, an incomplete one resumes from its
checkpoint, a failed one is retried only when asked. Ray's and Optuna's own folders are scratch (`.ray/`) or
the search's memory (`optuna.db`), never the record of what happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ibbench import results
from ibbench.config import (
    DECODER_AXIS,
    MAX_RUNS,
    PLACEMENT_FIELDS,
    ConfigError,
    RunConfig,
    SweepSpec,
    expand,
    plain,
)

log = logging.getLogger(__name__)

OPTUNA_DB = "optuna.db"
SPEC_FILE = "sweep.yaml"
RAY_SCRATCH = ".ray"
INTERRUPTED = "ibbench_interrupted"  # user attribute of Optuna trials whose driver died or was interrupted
STUDY_SWEEP = "ibbench_sweep"  # study user attributes: what the study searches (base, space, metric, mode) ...
STUDY_FINGERPRINT = "ibbench_fingerprint"  # ... and its sha256, compared on every rerun
# Ray Tune restarts a trial whose process or node died (a lost node, an OOM kill) this many times; the run resumes
# from its checkpoint. A run that failed on its own ends its trial without an error (FAILED below), so Tune,
# which retries every error, never restarts it only to read the failure back.
TRIAL_RETRIES = 2
# A trial's closing result when its run failed on its own (the reason is in summary.json): searchers record the
# trial as failed, schedulers ignore it, the live view counts it as an error.
FAILED = "ibbench_failed"


# -- the spec as data --------------------------------------------------------------------------------------------


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """The spec as a sweep file would hold it (with --set overrides folded into base)."""
    out: dict[str, Any] = {"name": spec.name, "base": {k: plain(v) for k, v in spec.base}}
    if spec.grid:
        out["grid"] = {k: [plain(v) for v in values] for k, values in spec.grid}
    if spec.baselines:
        out["baselines"] = [{k: plain(v) for k, v in b} for b in spec.baselines]
    if spec.search is not None:
        s = spec.search
        out["search"] = {
            "algorithm": s.algorithm, "num_samples": s.num_samples, "metric": s.metric, "mode": s.mode,
            "scheduler": s.scheduler, "grace_period": s.grace_period, "seed": s.seed,
            "space": {key: {kind: list(args)} for key, kind, args in s.space},
        }  # fmt: skip
    out["resources"] = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    if spec.max_concurrent is not None:
        out["max_concurrent"] = spec.max_concurrent
    if spec.max_runs != MAX_RUNS:
        out["max_runs"] = spec.max_runs
    return out


def write_spec(spec: SweepSpec, root: Path) -> None:
    """<sweep_dir>/sweep.yaml: the spec as run, which `status` and reports read (its metric, its mode)."""
    results.atomic_write_bytes(Path(root) / SPEC_FILE, yaml.safe_dump(spec_to_dict(spec), sort_keys=False).encode())


def sweep_metric(spec: SweepSpec) -> tuple[str, str]:
    """The (metric, mode) a sweep ranks runs by: the search's, else the first decoder's validation accuracy (a
    ranking is a selection: never by a test metric)."""
    if spec.search is not None:
        return spec.search.metric, spec.search.mode
    decoders = dict(spec.grid).get(DECODER_AXIS) or dict(spec.base).get("decoders") or RunConfig.decoders
    return f"val_acc/{plain(decoders)[0]}", "max"


# -- planning ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep and its state on disk."""

    cfg: RunConfig
    run_id: str
    run_dir: Path
    state: str  # done | failed | incomplete | new | stopped


def sweep_dir(spec: SweepSpec, out: Path) -> Path:
    return Path(out) / spec.name


def plan(spec: SweepSpec, out: Path) -> list[PlannedRun]:
    """The grid's runs with their states; for a search, the runs it has made so far."""
    root = sweep_dir(spec, out)
    if spec.search is None:
        started = set(os.listdir(root)) if root.is_dir() else set()  # one listing, not 4 stats per new run
        planned = []
        for cfg in expand(spec):
            rid = results.run_id(cfg)
            run_dir = root / rid
            planned.append(PlannedRun(cfg, rid, run_dir, results.run_state(run_dir) if rid in started else "new"))
        return planned
    return [PlannedRun(results.read_config(d), d.name, d, results.run_state(d)) for d in results.iter_run_dirs(root)]


def varying_fields(runs: list[PlannedRun]) -> list[str]:
    """Config fields whose values differ between runs, in RunConfig order."""
    if not runs:
        return []
    dicts = [r.cfg.to_dict() for r in runs]
    return [k for k in dicts[0] if any(str(d[k]) != str(dicts[0][k]) for d in dicts)]


def optuna_trial_count(spec: SweepSpec, out: Path) -> int:
    """Finished trials in the sweep's study (0 when there is none yet)."""
    db = sweep_dir(spec, out) / OPTUNA_DB
    if not db.exists():
        return 0
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        return 0
    return len(_finished_trials(study))


def _finished_trials(study) -> list:
    """Trials that used up the budget: completed or pruned. Failed ones do not (a rerun replaces them), nor do
    trials whose driver was interrupted (their points are asked again)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get(INTERRUPTED)]


# -- the study's identity ----------------------------------------------------------------------------------------


def study_identity(spec: SweepSpec) -> dict[str, Any]:
    """What a study's trials mean: base (with --set overrides) minus placement fields, space, metric and mode.

    num_samples, the scheduler and the sampler's seed may change between invocations; these may not.
    """
    s = spec.search
    return {
        **{f"base.{k}": plain(v) for k, v in spec.base if k not in PLACEMENT_FIELDS},
        **{f"search.space.{key}": {kind: plain(args)} for key, kind, args in s.space},
        "search.metric": s.metric,
        "search.mode": s.mode,
    }


def _fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _difference(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first field (`base.epochs`, `search.space.beta`) where two study identities differ, with both values."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(not set)"), new.get(key, "(not set)")
        if a != b:
            return key, a, b
    return None


def _load_study(spec: SweepSpec, out: Path):
    """The sweep's Optuna study, or None when it has none yet."""
    db = sweep_dir(spec, out) / OPTUNA_DB
    if not db.exists():
        return None
    import optuna

    try:
        return optuna.load_study(study_name=spec.name, storage=optuna.storages.RDBStorage(f"sqlite:///{db}"))
    except KeyError:
        return None


def check_study(spec: SweepSpec, out: Path) -> None:
    """ConfigError naming the first difference when the sweep's existing study was started by another sweep."""
    if spec.search is None:
        return
    study = _load_study(spec, out)
    stored = study.user_attrs.get(STUDY_SWEEP) if study is not None else None
    if stored is None:
        return
    found = _difference(stored, json.loads(json.dumps(study_identity(spec))))
    if found:
        where, old, new = found
        db = sweep_dir(spec, out) / OPTUNA_DB
        raise ConfigError(spec.source, where, f"{json.dumps(new)} differs from the study in {db}, started with "
                          f"{json.dumps(old)}", "the study's value, or --new-study to start a new study "
                          "(the old one is kept beside it)")  # fmt: skip


def archive_study(spec: SweepSpec, out: Path) -> Path | None:
    """Move the sweep's optuna.db aside (optuna-<time>.db) so the next search starts a new study; its path."""
    db = sweep_dir(spec, out) / OPTUNA_DB
    if not db.exists():
        return None
    kept = db.with_name(f"optuna-{time.strftime('%Y%m%d-%H%M%S')}.db")
    db.replace(kept)
    log.info("the previous study of %s is kept in %s", spec.name, kept)
    return kept


# -- driving Ray Tune --------------------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    """What one sweep invocation did, read back from the run directories."""

    sweep_dir: Path
    trained: list[str] = field(default_factory=list)  # run_ids this invocation ran
    skipped: list[str] = field(default_factory=list)  # already done
    states: dict[str, str] = field(default_factory=dict)  # run_id -> state after the sweep
    reasons: dict[str, str] = field(default_factory=dict)  # run_id -> why it failed
    retried: list[str] = field(default_factory=list)  # run_ids restarted after their process (or node) died
    held: list[str] = field(default_factory=list)  # pending runs left to other live jobs (skip=)
    # Trials that failed before their run directory held a record (a bad sampled config, data missing on a
    # worker, a run locked by another job): trial id -> reason. They did not use up num_samples.
    trial_failures: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False  # Ctrl-C (or the driver's loop ended early): unfinished runs resume on a rerun

    @property
    def failed(self) -> list[str]:
        return [rid for rid, state in self.states.items() if state == "failed"]

    @property
    def ok(self) -> bool:
        return (
            not self.failed
            and not self.trial_failures
            and not self.interrupted
            and all(s in ("done", "stopped") for s in self.states.values())
        )


Event = Callable[[str, dict[str, Any]], None]  # (kind, payload): start | result | complete | error


def check_resources(spec: SweepSpec, cpus: float, gpus: float, where: str) -> None:
    """ConfigError when one trial needs more CPUs or GPUs than `where` (a machine, a Ray cluster) has."""
    if spec.resources.gpu > 0 and gpus < spec.resources.gpu:
        raise ConfigError(spec.source, "resources.gpu", f"{spec.resources.gpu:g} GPU per trial, but {where} has "
                          f"{gpus:g}", "gpu: 0 on a machine without GPUs")  # fmt: skip
    if cpus < spec.resources.cpu:
        raise ConfigError(spec.source, "resources.cpu", f"{spec.resources.cpu:g} CPUs per trial, but {where} has "
                          f"{cpus:g}", f"at most {cpus:g}")  # fmt: skip


def _trial_config(config: dict[str, Any]) -> RunConfig:
    """The RunConfig of a trial's config: a grid's run, or the base with the searched values."""
    values = dict(config["run"]) if "run" in config else dict(config["base"])
    values.update({k: v for k, v in config.items() if k not in ("run", "base", "_ibbench")})
    return RunConfig.from_dict(values, config["_ibbench"]["source"])


def trial_device(cfg: RunConfig, gpu_ids: list[str]) -> RunConfig:
    """A trial that Ray gave no GPU runs on the CPU: Ray ≥ 2.x leaves every GPU visible to a trial that reserved
    none, where `device: auto` would open an uncounted CUDA context on cuda:0. The device is a placement field,
    so the run (its id, its files) is the same."""
    if cfg.device == "auto" and not gpu_ids:
        return cfg.replace(device="cpu")
    return cfg


def _trainable(config: dict[str, Any]) -> None:
    """One Ray Tune trial: build the RunConfig, then train.run into <sweep_dir>/<run_id>."""
    import ray
    import torch
    from ray import tune

    from ibbench import train

    settings = config["_ibbench"]
    torch.set_num_threads(settings["threads"])  # one trial per reserved core: no OpenMP oversubscription
    cfg = _trial_config(config)
    run_dir = Path(settings["sweep_dir"]) / results.run_id(cfg)
    if results.run_state(run_dir) == "failed":
        summary = results.read_summary(run_dir) or {}
        if not (settings["retry_failed"] and _failed_before(summary, settings["since"])):
            # It failed on its own before this sweep, without --retry-failed: say so rather than train it again.
            _report_failed(config, results.run_id(cfg))
            return
        results.clear_failure(run_dir)

    def report(metrics: dict[str, Any]) -> None:
        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})

    # The GPUs Ray gave this trial (it sets CUDA_VISIBLE_DEVICES to them); recorded in summary.json.
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    try:
        summary = train.run(trial_device(cfg, gpu_ids), run_dir, report=report, gpu_ids=gpu_ids)
    except train.TrainingFailed:
        # Recorded in the run directory with its reason: an error here would have Tune restart the trial (it
        # retries every error, meant for dead processes and nodes) only to read that failure back.
        _report_failed(config, results.run_id(cfg))
        return
    # The trial's last result is what searchers and schedulers read when it completes (Ray's closing result
    # does not always carry the metrics), and a run that was DONE already reported nothing: report the final
    # metrics once more.
    report({**(summary.get("final") or {}), "run_id": results.run_id(cfg)})


def _report_failed(config: dict[str, Any], rid: str) -> None:
    """End a trial whose run failed on its own. Tune insists that a result carry the search's metric: NaN, which
    no searcher or scheduler here reads as a value (they see FAILED first)."""
    from ray import tune

    metric = config["_ibbench"].get("metric")
    tune.report({FAILED: 1, "run_id": rid, **({metric: float("nan")} if metric else {})})


def _failed_before(summary: dict[str, Any], since: float) -> bool:
    """Whether a failed run's attempt started before `since` (a time.time()), i.e. before this sweep began."""
    try:
        return datetime.fromisoformat(summary["started"]).timestamp() < since
    except (KeyError, TypeError, ValueError):
        return True  # no start time recorded: not from this sweep's trials, which all record one


def _space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    domains = {}
    for key, kind, args in spec.search.space:
        if kind == "uniform":
            domains[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "loguniform":
            domains[key] = tune.loguniform(float(args[0]), float(args[1]))
        elif kind == "int":
            domains[key] = tune.randint(int(args[0]), int(args[1]) + 1)  # inclusive upper bound, as written
        else:
            domains[key] = tune.choice(list(args))
    return domains


def _end_running_trials(study, storage) -> int:
    """End trials left RUNNING (their driver was interrupted or killed) and ask their points again: their run
    directories resume from their checkpoints. Returns how many."""
    import optuna

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params)
    return len(running)


def _prepare_study(spec: SweepSpec, root: Path):
    """The RDB storage, trials remaining, trials so far; the study's identity checked (or recorded when new)."""
    import optuna

    check_study(spec, root.parent)
    storage = optuna.storages.RDBStorage(f"sqlite:///{root / OPTUNA_DB}")
    direction = "maximize" if spec.search.mode == "max" else "minimize"
    study = optuna.create_study(study_name=spec.name, storage=storage, direction=direction, load_if_exists=True)
    if STUDY_SWEEP not in study.user_attrs:  # a new study (or one from before fingerprints): remember what it is
        identity = study_identity(spec)
        study.set_user_attr(STUDY_SWEEP, identity)
        study.set_user_attr(STUDY_FINGERPRINT, _fingerprint(identity))
    _end_running_trials(study, storage)
    finished = len(study.trials)
    remaining = spec.search.num_samples - len(_finished_trials(study))
    return storage, max(0, remaining), finished


def _events_callback(on_event: Event):
    """A Ray Tune callback forwarding trial events to on_event (the CLI's single live view)."""
    from ray.tune import Callback

    class Forward(Callback):
        def __init__(self, emit: Event):
            self.emit = emit

        def __getstate__(self):
            return {"emit": None}  # Ray pickles its run config for restores; the live view stays in this process

        def on_trial_start(self, iteration, trials, trial, **info):
            if self.emit:
                self.emit("start", {"trial": trial.trial_id})

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.emit:
                self.emit("result", {"trial": trial.trial_id, **result})

        def on_trial_complete(self, iteration, trials, trial, **info):
            if self.emit:
                self.emit("error" if (trial.last_result or {}).get(FAILED) else "complete", {"trial": trial.trial_id})

        def on_trial_error(self, iteration, trials, trial, **info):
            if self.emit:
                self.emit("error", {"trial": trial.trial_id})

    return Forward(on_event)


def _retries_callback(retried: list[str]):
    """A Ray Tune callback appending to `retried` the run id of each trial restarted after a failure."""
    from ray.tune import Callback

    class Retries(Callback):
        def __init__(self, into: list[str]):
            self.into = into

        def __getstate__(self):
            return {"into": []}  # pickled for restores; the list stays in this process

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.into.append(results.run_id(_trial_config(trial.config)))

    return Retries(retried)


def run_sweep(
    spec: SweepSpec,
    out: Path,
    *,
    retry_failed: bool = False,
    on_event: Event | None = None,
    skip: frozenset[str] = frozenset(),
) -> SweepOutcome:
    """Train every pending run of spec through Ray Tune (Ray must be initialised: see ibbench.launch).

    skip: run ids another live job holds (a grid's runs only): left alone, listed in the outcome's `held`.
    """
    import ray
    from ray import tune

    root = sweep_dir(spec, out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    write_spec(spec, root)
    outcome = SweepOutcome(root)
    cluster = ray.cluster_resources()
    check_resources(spec, cluster.get("CPU", 0), cluster.get("GPU", 0), "the Ray cluster")
    settings = {
        "sweep_dir": str(root),
        "source": spec.source,
        "retry_failed": retry_failed,
        "threads": max(1, int(spec.resources.cpu)),
        "since": time.time(),
        "metric": spec.search.metric if spec.search is not None else None,
    }
    trainable = tune.with_resources(_trainable, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    callbacks = [_retries_callback(outcome.retried)]
    callbacks += [_events_callback(on_event)] if on_event is not None else []
    run_config = tune.RunConfig(
        name=time.strftime("tune-%Y%m%d-%H%M%S"),
        storage_path=str(root / RAY_SCRATCH),
        failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES, fail_fast=False),
        verbose=0,
        callbacks=callbacks,
    )
    before = {p.run_id: p.state for p in plan(spec, out)}
    if spec.search is None:
        pending = [
            p for p in plan(spec, out) if p.state in ("new", "incomplete") or (retry_failed and p.state == "failed")
        ]
        outcome.held = [p.run_id for p in pending if p.run_id in skip]
        pending = [p for p in pending if p.run_id not in skip]
        outcome.skipped = [rid for rid, state in before.items() if state == "done"]
        outcome.trained = [p.run_id for p in pending]
        if pending:
            tuner = tune.Tuner(
                trainable,
                param_space={"run": tune.grid_search([p.cfg.to_dict() for p in pending]), "_ibbench": settings},
                tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, reuse_actors=True),
                run_config=run_config,
            )
            _fit(tuner, spec, outcome, root)
            # A run neither finished nor failed after Tune's loop ended without an error: the loop was stopped.
            outcome.interrupted |= any(results.run_state(p.run_dir) in ("new", "incomplete") for p in pending
                                       if p.run_id not in outcome.trial_failures)  # fmt: skip
        ids = list(before)
    else:
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch

        storage, remaining, existing = _prepare_study(spec, root)
        if remaining:
            searcher = _failing_optuna(OptunaSearch)(
                metric=spec.search.metric, mode=spec.search.mode, study_name=spec.name, storage=storage,
                # The same seed on every invocation would redraw the first invocation's points.
                seed=(spec.search.seed + existing) % 2**32,
            )  # fmt: skip
            scheduler = None
            if spec.search.scheduler == "asha":
                base_cfg = RunConfig.from_dict({k: plain(v) for k, v in spec.base}, spec.source)
                max_evals = -(-base_cfg.epochs // base_cfg.eval_every) + 1  # one report per eval epoch, one at the end
                scheduler = _recording_asha(ASHAScheduler)(
                    time_attr="training_iteration", max_t=max_evals, grace_period=spec.search.grace_period
                )
            tuner = tune.Tuner(
                trainable,
                param_space={"base": {k: plain(v) for k, v in spec.base}, "_ibbench": settings, **_space(spec)},
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=remaining,
                    metric=spec.search.metric,
                    mode=spec.search.mode,
                    max_concurrent_trials=spec.max_concurrent,
                    reuse_actors=True,
                ),  # fmt: skip
                run_config=run_config,
            )
            try:
                _fit(tuner, spec, outcome, root)
            finally:
                # Trials still RUNNING in the study were cut off (Ctrl-C, or Tune's loop stopped): end them and
                # ask their points again on the next invocation.
                import optuna

                study = optuna.load_study(study_name=spec.name, storage=storage)
                outcome.interrupted |= _end_running_trials(study, storage) > 0
                for rid in scheduler.stopped if scheduler is not None else ():
                    if results.run_state(root / rid) == "incomplete":
                        # ASHA ended it: a decision, not a crash, so a re-run must not train it again.
                        stopped = {"status": "stopped", "run_id": rid, "reason": "stopped early by the ASHA scheduler"}
                        results.write_summary(root / rid, stopped)
        after_ids = [d.name for d in results.iter_run_dirs(root)]
        outcome.trained = [rid for rid in after_ids if before.get(rid) not in ("done", "stopped")]
        outcome.skipped = [rid for rid, state in before.items() if state in ("done", "stopped")]
        ids = after_ids
    for rid in ids:
        state = results.run_state(root / rid)
        outcome.states[rid] = state
        if state == "failed":
            outcome.reasons[rid] = (results.read_summary(root / rid) or {}).get("reason", "unknown")
    # Tune restarts failed trials too; a run that failed on its own was not retrained, so it is not listed.
    outcome.retried = sorted({rid for rid in outcome.retried if outcome.states.get(rid) != "failed"})
    return outcome


@contextlib.contextmanager
def _ctrl_c_raises() -> Iterator[None]:
    """Let Ctrl-C raise KeyboardInterrupt out of Tuner.fit instead of Tune's handler, which ends the experiment
    quietly: fit then returns as if done, and an interrupted run could not be told from a finished one."""
    previous = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous


def _fit(tuner, spec: SweepSpec, outcome: SweepOutcome, root: Path) -> None:
    """tuner.fit(); trials that errored without a failed run directory go to outcome.trial_failures, keyed by
    their run id (grid) or their sampled values (search)."""
    try:
        with _ctrl_c_raises():
            grid = tuner.fit()
    except KeyboardInterrupt:
        outcome.interrupted = True
        raise
    for result in grid:
        if result.error is None:
            continue
        config = result.config or {}
        try:  # the trial's run: its directory, when it got one, holds the failure and its reason
            rid = results.run_id(_trial_config(config))
        except Exception:  # noqa: BLE001 (a sampled config that is not a valid run failed before it had one)
            rid = None
        if rid and results.run_state(root / rid) == "failed":
            continue
        if "run" in config:
            key = results.run_id(RunConfig.from_dict(config["run"], spec.source))
        else:
            key = "trial " + ", ".join(f"{k}={config.get(k)!r}" for k, _, _ in spec.search.space)
        outcome.trial_failures[key] = _error_reason(result.error)


def _error_reason(error: BaseException) -> str:
    """The error a trial raised, as one line: the original exception (Ray wraps it) and its message."""
    cause = getattr(error, "cause", None) or error
    message = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {message[0] if message else ''}".strip()


def _recording_asha(base: type) -> type:
    """ASHAScheduler that remembers the runs it stopped early, so only those are marked `stopped`."""

    class RecordingASHA(base):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.stopped: set[str] = set()  # run ids

        def on_trial_result(self, tune_controller, trial, result):
            if result.get(FAILED):
                return self.CONTINUE  # the run failed: its trial ends now, with nothing for the rungs
            action = super().on_trial_result(tune_controller, trial, result)
            if action == self.STOP and result.get("run_id"):
                self.stopped.add(result["run_id"])
            return action

        def on_trial_complete(self, tune_controller, trial, result):
            if not result.get(FAILED):
                super().on_trial_complete(tune_controller, trial, result)

    return RecordingASHA


def _failing_optuna(base: type) -> type:
    """OptunaSearch that records a trial whose run failed on its own as FAIL, as it would an errored trial."""

    class FailingOptuna(base):
        def on_trial_complete(self, trial_id, result=None, error=False):
            if result and result.get(FAILED):
                result, error = None, True
            super().on_trial_complete(trial_id, result=result, error=error)

    return FailingOptuna
