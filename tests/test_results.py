"""The run directory: identity, atomic writers, torn lines, run states and the pandas loaders."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from ibbench import results
from ibbench.config import RunConfig

DIGITS = RunConfig(dataset="digits", encoder="mlp", latent_dim=8, epochs=2, eval_every=1, batch_size=100)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- identity


def test_run_id_is_12_hex_and_stable():
    rid = results.run_id(DIGITS)
    assert re.fullmatch(r"[0-9a-f]{12}", rid)
    assert results.run_id(RunConfig.from_dict(DIGITS.to_dict())) == rid
    assert results.run_id(DIGITS.replace(beta=DIGITS.beta)) == rid


@pytest.mark.parametrize(
    "change",
    [{"beta": 0.3}, {"seed": 1}, {"noise": False}, {"decoders": ["gmm", "resfc"]}, {"k": 2}, {"epochs": 3}],
)
def test_run_id_changes_with_results(change):
    assert results.run_id(DIGITS.replace(**change)) != results.run_id(DIGITS)


@pytest.mark.parametrize(
    "change", [{"data_dir": "/elsewhere"}, {"device": "cpu"}, {"download": True}, {"checkpoint_every_s": 0}]
)
def test_run_id_ignores_placement(change):
    assert results.run_id(DIGITS.replace(**change)) == results.run_id(DIGITS)


# ---------------------------------------------------------------- writers and readers


def test_atomic_writers_leave_no_temp_files(tmp_path: Path):
    run = tmp_path / "run"
    results.write_config(run, DIGITS)
    results.write_config(run, DIGITS.replace(device="cpu"))  # same run, other placement: allowed
    results.write_summary(run, {"status": "done", "x": math.nan, "y": [math.inf, 1.0]})
    results.append_metrics(run, {"epoch": 1, "h_z": math.inf})
    results.append_metrics(run, {"epoch": 2, "h_z": 1.5})
    results.truncate_metrics(run, 1)
    results.mark_done(run)
    assert names(run) == sorted([results.CONFIG, results.METRICS, results.SUMMARY, results.DONE])
    assert results.read_summary(run) == {"status": "done", "x": None, "y": [None, 1.0]}  # strict JSON
    assert results.read_metrics(run) == [{"epoch": 1, "h_z": None}]
    assert results.read_config(run) == DIGITS.replace(device="cpu")


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "summary.json"
    results.write_json(path, {"old": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        results.write_json(path, {"new": 2})
    assert names(tmp_path) == ["summary.json"]
    assert results.read_json(path) == {"old": 1}


def test_write_config_refuses_another_run(tmp_path: Path):
    results.write_config(tmp_path, DIGITS)
    with pytest.raises(ValueError, match="different run"):
        results.write_config(tmp_path, DIGITS.replace(beta=0.5))


def test_read_metrics_skips_a_torn_last_line(tmp_path: Path):
    assert results.read_metrics(tmp_path) == []
    results.append_metrics(tmp_path, {"epoch": 1, "acc/gmm": 0.5})
    results.append_metrics(tmp_path, {"epoch": 2, "acc/gmm": 0.6})
    with (tmp_path / results.METRICS).open("a") as f:
        f.write('{"epoch": 3, "acc/g')
    assert results.read_metrics(tmp_path) == [{"epoch": 1, "acc/gmm": 0.5}, {"epoch": 2, "acc/gmm": 0.6}]


def test_truncate_metrics(tmp_path: Path):
    for epoch in (1, 2, 3, 4):
        results.append_metrics(tmp_path, {"epoch": epoch, "loss": float(epoch)})
    with (tmp_path / results.METRICS).open("a") as f:
        f.write('{"epoch": 5, "lo')
    results.truncate_metrics(tmp_path, 2)
    assert [r["epoch"] for r in results.read_metrics(tmp_path)] == [1, 2]
    assert (tmp_path / results.METRICS).read_text().count("\n") == 2  # the torn line is gone too
    results.truncate_metrics(tmp_path, 0)
    assert results.read_metrics(tmp_path) == []


def test_run_state(tmp_path: Path):
    run = tmp_path / "run"
    assert results.run_state(run) == "new"  # missing folder
    run.mkdir()
    assert results.run_state(run) == "new"
    results.write_config(run, DIGITS)
    assert results.run_state(run) == "incomplete"
    results.write_summary(run, {"status": "failed", "reason": "non-finite loss (nan) in batch 3"})
    assert results.run_state(run) == "failed"
    results.clear_failure(run)
    assert results.run_state(run) == "incomplete"
    results.write_summary(run, {"status": "done"})
    assert results.run_state(run) == "incomplete"  # DONE, written last, is what says done
    results.mark_done(run)
    assert results.run_state(run) == "done"


def test_read_summary_of_a_broken_file(tmp_path: Path):
    (tmp_path / results.SUMMARY).write_text('{"status": "fai')
    assert results.read_summary(tmp_path) is None
    assert results.run_state(tmp_path) == "new"


# ---------------------------------------------------------------- loaders

ROBUSTNESS = {"gmm": {"fgsm": {"0": 0.9, "0.0313725": 0.4}}, "resfc": {"fgsm": {"0": 0.92, "0.0313725": 0.3}}}


@pytest.fixture
def sweep_root(tmp_path: Path) -> Path:
    """<root>/demo/{done, failed, half-written, unreadable-config} runs and a .ray scratch folder."""
    root = tmp_path / "runs"
    sweep = root / "demo"
    done_cfg, failed_cfg, half_cfg = DIGITS.replace(decoders=["gmm", "resfc"]), DIGITS.replace(beta=0.9), DIGITS

    done = sweep / results.run_id(done_cfg)
    results.write_config(done, done_cfg)
    rows = [{"run_id": done.name, "epoch": e, "acc/gmm": 0.8 + e / 100, "acc/resfc": 0.85, "h_z": 3.0} for e in (1, 2)]
    for row in rows:
        results.append_metrics(done, row)
    results.write_summary(
        done,
        {"status": "done", "run_id": done.name, "final": rows[-1], "robustness": ROBUSTNESS, "wall_time": 12.5},
    )
    results.mark_done(done)

    failed = sweep / results.run_id(failed_cfg)
    results.write_config(failed, failed_cfg)
    results.write_summary(
        failed, {"status": "failed", "reason": "non-finite loss (nan) in batch 4", "epochs_done": 0, "wall_time": 1.0}
    )

    half = sweep / results.run_id(half_cfg)
    results.write_config(half, half_cfg)
    results.append_metrics(half, {"run_id": half.name, "epoch": 1, "acc/gmm": 0.7})
    with (half / results.METRICS).open("a") as f:
        f.write(json.dumps({"run_id": half.name, "epoch": 2})[:-1] + ', "acc/gm')

    broken = sweep / "0123456789ab"
    broken.mkdir()
    (broken / results.CONFIG).write_text('{"dataset": "dig')

    scratch = root / ".ray" / "session"
    results.write_config(scratch, DIGITS.replace(seed=99))
    results.mark_done(scratch)
    (root / "notes.txt").write_text("not a run")
    return root


def test_load_runs(sweep_root: Path):
    frame = load_ok(sweep_root)
    by_id = frame.set_index("run_id")
    assert len(frame) == 4
    assert set(frame["sweep"]) == {"demo"}
    status = by_id["status"].to_dict()
    done_id = results.run_id(DIGITS.replace(decoders=["gmm", "resfc"]))
    failed_id = results.run_id(DIGITS.replace(beta=0.9))
    half_id = results.run_id(DIGITS)
    assert status == {done_id: "done", failed_id: "failed", half_id: "incomplete", "0123456789ab": "incomplete"}
    assert by_id.loc[failed_id, "reason"] == "non-finite loss (nan) in batch 4"
    assert by_id.loc[done_id, "acc/gmm"] == pytest.approx(0.82)
    assert by_id.loc[done_id, "acc/resfc"] == pytest.approx(0.85)
    assert by_id.loc[done_id, "wall_time"] == 12.5
    assert by_id.loc[done_id, "robust/fgsm/gmm/0.0313725"] == 0.4
    assert by_id.loc[done_id, "robust/fgsm/resfc/0"] == 0.92
    assert by_id.loc[half_id, "epochs_done"] == 1
    assert by_id.loc[done_id, "decoders"] == ("gmm", "resfc")  # hashable, so it groups
    assert by_id.loc[failed_id, "beta"] == 0.9
    assert "unreadable config.json" in by_id.loc["0123456789ab", "reason"]
    assert frame.groupby("decoders").size().sum() == 3


def test_load_metrics(sweep_root: Path):
    frame = results.load_metrics(sweep_root)
    assert isinstance(frame, pd.DataFrame)
    done_id = results.run_id(DIGITS.replace(decoders=["gmm", "resfc"]))
    half_id = results.run_id(DIGITS)
    pairs = sorted(zip(frame["run_id"], frame["epoch"], strict=True))
    assert pairs == sorted([(done_id, 1), (done_id, 2), (half_id, 1)])
    assert set(frame.loc[frame["run_id"] == half_id, "status"]) == {"incomplete"}
    assert set(frame.loc[frame["run_id"] == done_id, "status"]) == {"done"}
    assert {"acc/gmm", "beta", "decoders", "sweep"} <= set(frame.columns)
    assert 99 not in set(frame["seed"])  # the .ray scratch run is not read


def test_load_a_single_run_dir(sweep_root: Path):
    done = sweep_root / "demo" / results.run_id(DIGITS.replace(decoders=["gmm", "resfc"]))
    frame = results.load_runs(done)
    assert list(frame["status"]) == ["done"] and list(frame["sweep"]) == ["demo"]


def test_load_empty_or_missing(tmp_path: Path):
    for root in (tmp_path, tmp_path / "missing", str(tmp_path / "missing")):
        frame = results.load_runs(root)
        assert isinstance(frame, pd.DataFrame) and frame.empty
        assert results.load_metrics(root).empty
    (tmp_path / ".ray").mkdir()
    results.write_config(tmp_path / ".ray" / "trial", DIGITS)
    assert results.load_runs(tmp_path).empty


def load_ok(root: Path) -> pd.DataFrame:
    frame = results.load_runs(root)
    assert isinstance(frame, pd.DataFrame)
    json.dumps(frame.drop(columns=["decoders", "fgsm_eps"]).to_dict("records"), default=str)  # plain values
    return frame


def test_run_lock_keeps_a_second_trainer_out(tmp_path):
    from ibbench.results import RunLocked, run_lock

    with run_lock(tmp_path):
        with pytest.raises(RunLocked, match="another process"):
            with run_lock(tmp_path, wait_s=0.2):
                pass
    with run_lock(tmp_path, wait_s=0.2):  # released when the holder leaves
        pass


def test_final_metrics_never_overwrite_config_fields(tmp_path):
    from ibbench.config import RunConfig
    from ibbench.results import append_metrics, load_metrics, load_runs, mark_done, write_config, write_summary

    cfg = RunConfig.from_dict({"dataset": "digits", "encoder": "mlp", "lr": 0.001})
    run_dir = tmp_path / "s" / "r"
    run_dir.mkdir(parents=True)
    write_config(run_dir, cfg)
    append_metrics(run_dir, {"epoch": 1, "lr": 0.0003, "acc/gmm": 0.9})
    write_summary(run_dir, {"status": "done", "final": {"epoch": 1, "lr": 0.0003, "acc/gmm": 0.9}})
    mark_done(run_dir)
    runs = load_runs(tmp_path)
    assert runs.loc[0, "lr"] == 0.001 and runs.loc[0, "final/lr"] == 0.0003
    metrics = load_metrics(tmp_path)
    assert metrics.loc[0, "lr"] == 0.001 and metrics.loc[0, "epoch/lr"] == 0.0003
