"""The `ibbench` command: version/help, one-line errors with exit code 2, a tiny real run and its skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ibbench import results, train
from ibbench.cli import main
from ibbench.config import load_run_config

SCRIPT = Path(sys.executable).parent / "ibbench"


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("ibbench ")


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: ibbench" in out and "run" in out
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    assert "--set" in capsys.readouterr().out
    assert main([]) == 0  # no command: help, success
    assert "usage: ibbench" in capsys.readouterr().out


# (YAML file text or None for the defaults, --set items, text the error line must hold)
BAD = {
    "unknown_key": (None, ["betta=0.3"], "betta: unknown field; allowed: dataset"),
    "unknown_key_in_file": ("betta: 0.3\n", [], "betta: unknown field"),
    "string_for_int": (None, ["epochs=ten"], "epochs: expected an integer"),
    "yes_string_for_bool": (None, ["noise='yes'"], "noise: expected true or false"),
    "beta_one": (None, ["beta=1.0"], "beta: β'' = 1.0"),
    "beta_negative": ("beta: -0.1\n", [], "beta: β'' = -0.1"),
    "k_zero": (None, ["k=0"], "k: 0 is not a positive integer"),
    "unknown_encoder": (None, ["encoder=vit"], "allowed: cnn, mlp, resnet18"),
    "unknown_dataset": (None, ["dataset=mnist"], "allowed: cifar10, digits, synthetic"),
    "unknown_objective": (None, ["objective=vae"], "allowed: ce, ce_dropconnect, ib, nlib, vib"),
    "unknown_decoder": (None, ["decoders=[gmm,knn]"], "allowed: gmm, logreg, resfc"),
    "empty_decoders": (None, ["decoders=[]"], "decoders: at least one"),
    "batch_not_multiple": (None, ["batch_size=505"], "batch_size: batch_size 505 is not a multiple"),
    "batch_too_small_for_k": (None, ["batch_size=20", "k=2"], "use batch_size >= 30"),
    "negative_lr": (None, ["lr=-1e-3"], "lr: -0.001 is not a positive"),
    "eps_above_one": (None, ["fgsm_eps=[0, 8]"], "fgsm_eps: ε = 8.0"),
    "unknown_device": (None, ["device=tpu"], "allowed: auto, cpu, cuda"),
    "yaml_syntax": ("beta: 0.1\nk: [1, 2\nseed: 0\n", [], ": line 3: invalid YAML"),
    "top_level_list": ("- 1\n- 2\n", [], "(top level): expected a mapping"),
    "bad_set_syntax": (None, ["beta"], "--set: beta: expected key=value"),
}


@pytest.mark.parametrize("text, sets, needle", list(BAD.values()), ids=list(BAD))
def test_bad_config_exits_2_with_one_line(tmp_path: Path, capsys, text, sets, needle):
    args = ["run"]
    if text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        args.append(str(path))
    for item in sets:
        args += ["--set", item]
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert needle in line
    if text is not None:
        assert line.startswith(f"error: {tmp_path / 'bad.yaml'}: ")
    assert files_under(out) == []


def test_missing_config_file(tmp_path: Path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'nope.yaml'}: (file): cannot read" in line


def test_console_script_exit_code(tmp_path: Path):
    """The real `ibbench` executable: exit status 2 and a single stderr line, even on a narrow terminal."""
    env = {**os.environ, "COLUMNS": "40"}
    proc = subprocess.run(
        [str(SCRIPT), "run", "--set", "k=0", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "k: 0 is not a positive integer" in line
    assert files_under(tmp_path / "out") == []


def test_cifar10_missing_offline(tmp_path: Path, capsys):
    empty = tmp_path / "no_data"
    empty.mkdir()
    out = tmp_path / "out"
    assert main(["run", "--set", f"data_dir={empty}", "--set", "epochs=1", "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(empty) in line and "data_dir" in line and "CIFAR-10 not found" in line
    assert files_under(out) == []


TINY = [
    "--set",
    "dataset=digits",
    "--set",
    "encoder=mlp",
    "--set",
    "latent_dim=8",
    "--set",
    "epochs=2",
    "--set",
    "batch_size=100",
    "--set",
    "eval_every=1",
    "--set",
    "probe_width=16",
    # the whole attack suite on a small budget (test_attacks checks attack strength)
    *("--set", "pgd_steps=3", "--set", "apgd_steps=5", "--set", "square_queries=20", "--set", "attack_images=100"),
]


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared 2-core machine: one intra-op thread is ~7x faster than oversubscribing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_tiny_run_then_done_already(tmp_path: Path, capsys, monkeypatch, one_thread):
    out = tmp_path / "out"
    assert main(["run", *TINY, "--out", str(out)]) == 0
    cfg = load_run_config(None, TINY[1::2])
    run_dir = out / "default" / results.run_id(cfg)
    assert results.run_state(run_dir) == "done"
    assert (run_dir / results.DONE).exists()
    assert results.read_config(run_dir) == cfg
    assert [row["epoch"] for row in results.read_metrics(run_dir)] == [1, 2]
    summary = results.read_summary(run_dir)
    assert summary["status"] == "done" and "acc/gmm" in summary["final"]
    first = capsys.readouterr()
    assert "run " + run_dir.name in first.out
    done_mtime = (run_dir / results.DONE).stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a done run was trained again")

    monkeypatch.setattr(train, "run", no_training)
    assert main(["run", *TINY, "--out", str(out)]) == 0
    again = capsys.readouterr()
    assert "done already" in again.out
    assert (run_dir / results.DONE).stat().st_mtime_ns == done_mtime
