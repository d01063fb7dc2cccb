"""Sweep files: every shipped sweep loads and expands to the runs its grid implies; malformed ones fail with one
`<file>: <field>: …; allowed: …` error before anything starts; `ibbench sweep --dry-run` lists runs without Ray."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from ibbench import cli, results
from ibbench.config import ConfigError, RunConfig, load_sweep, read_yaml
from ibbench.sweep import expand, plan, spec_to_dict

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))
SHIPPED = {
    "quickstart",
    "noise_ablation",
    "beta_sweep",
    "k_ablation",
    "decoder_comparison",
    "optuna_beta_k",
    "paper_cifar10",
}

# A small valid base: digits has 10 classes, so batch 100 gives 10 samples per class (> k = 3).
BASE = "name: bad\nbase: {dataset: digits, encoder: mlp, latent_dim: 8, batch_size: 100, k: 3}\n"


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def expected_runs(raw: dict) -> tuple[int, list]:
    """(run count, seeds) computed from the file alone: grid product without the decoder axis + baselines × seeds."""
    grid = raw.get("grid") or {}
    axes = [values for key, values in grid.items() if key != "decoder"]
    seeds = grid.get("seed", [(raw.get("base") or {}).get("seed", RunConfig.seed)])
    # A list in a baselines entry is that entry's own axis (a list of lists for the list fields).
    per_entry = [math.prod(len(v) for k, v in b.items() if isinstance(v, list) and (k not in ("decoders", "fgsm_eps")
                           or all(isinstance(x, list) for x in v))) for b in raw.get("baselines") or []]  # fmt: skip
    return math.prod(len(v) for v in axes) + sum(per_entry) * len(seeds), seeds


# -- the shipped sweep files -------------------------------------------------------------------------------------


def test_all_sweeps_shipped():
    assert SHIPPED | {"ib_family", "ib_family_digits"} <= {p.stem for p in SWEEP_FILES}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_loads_and_expands(path: Path):
    raw = read_yaml(path)
    spec = load_sweep(path)
    assert spec.name == path.stem  # the file name and the output folder agree
    runs = expand(spec)
    if "search" in raw:
        assert runs == []
        assert spec.search is not None and not spec.grid and not spec.baselines
        return
    count, seeds = expected_runs(raw)
    assert len(runs) == count
    assert len({results.run_id(r) for r in runs}) == len(runs)
    grid = raw.get("grid") or {}
    base = raw.get("base") or {}
    # The decoder axis folds into every run's decoders list (baselines included): one encoder per combination.
    decoders = tuple(grid.get("decoder", base.get("decoders", RunConfig.decoders)))
    assert all(r.decoders == decoders for r in runs)
    baselines = raw.get("baselines") or []
    n_grid = math.prod(len(v) for k, v in grid.items() if k != "decoder")
    for key, values in grid.items():
        if key != "decoder":
            assert {getattr(r, key) for r in runs[:n_grid]} == set(values), key
    expected_tail = []
    for b in baselines:
        axes = [v for v in b.values() if isinstance(v, list)]
        objective = b.get("objective", base.get("objective", RunConfig.objective))
        expected_tail += [(objective, s) for _ in range(math.prod(len(v) for v in axes)) for s in seeds]
    assert [(r.objective, r.seed) for r in runs[n_grid:]] == expected_tail
    for key, value in base.items():
        if key not in grid and all(key not in b for b in baselines):
            want = tuple(value) if isinstance(value, list) else value
            assert all(getattr(r, key) == want for r in runs), key


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_spec_to_dict_round_trips(path: Path, tmp_path: Path):
    """sweep.yaml as written into a sweep folder loads back to the same spec and the same runs."""
    spec = load_sweep(path)
    copy = write(tmp_path, yaml.safe_dump(spec_to_dict(spec), sort_keys=False), path.name)
    again = load_sweep(copy)
    assert spec_to_dict(again) == spec_to_dict(spec)
    assert [results.run_id(r) for r in expand(again)] == [results.run_id(r) for r in expand(spec)]


def test_cifar_sweeps_use_the_paper_model():
    for path in SWEEP_FILES:
        spec = load_sweep(path)
        base = spec.base_dict
        if base.get("dataset", RunConfig.dataset) == "cifar10":
            assert base.get("encoder", RunConfig.encoder) == "resnet18", path.name
            assert base.get("latent_dim", RunConfig.latent_dim) == 256, path.name
            assert spec.resources.gpu > 0, path.name


def test_paper_recipe():
    spec = load_sweep(ROOT / "sweeps" / "paper_cifar10.yaml")
    runs = expand(spec)
    assert {(r.epochs, r.lr, r.lr_patience, r.encoder, r.latent_dim) for r in runs} == {
        (150, 5e-4, 10, "resnet18", 256)
    }
    assert {r.noise for r in runs if r.objective == "ib"} == {True, False}
    assert {r.objective for r in runs} == {"ib", "ce", "ce_dropconnect"}
    assert {r.decoders for r in runs} == {("gmm", "resfc")}


def test_optuna_search_spec():
    spec = load_sweep(ROOT / "sweeps" / "optuna_beta_k.yaml")
    s = spec.search
    assert (s.algorithm, s.num_samples, s.metric, s.mode, s.scheduler) == (
        "optuna",
        32,
        "val_acc/gmm",
        "max",
        "asha",
    )
    assert dict((k, (kind, args)) for k, kind, args in s.space) == {
        "beta": ("uniform", (0.0, 0.99)),
        "k": ("int", (1, 20)),
    }
    assert spec.base_dict["dataset"] == "cifar10"
    assert "gmm" in spec.base_dict.get("decoders", RunConfig.decoders)  # the metric's decoder is fitted
    assert plan(spec, Path("/nonexistent")) == []


# -- expansion rules ---------------------------------------------------------------------------------------------


def test_duplicates_removed(tmp_path: Path):
    text = BASE + "grid: {beta: [0.1, 0.5, 0.1], decoder: [gmm, resfc, gmm], seed: [0, 1]}\n"
    text += "baselines: [{objective: ce}, {objective: ce}]\n"
    runs = expand(load_sweep(write(tmp_path, text)))
    assert [(r.objective, r.beta, r.seed) for r in runs] == [
        ("ib", 0.1, 0),
        ("ib", 0.1, 1),
        ("ib", 0.5, 0),
        ("ib", 0.5, 1),
        ("ce", 0.1, 0),
        ("ce", 0.1, 1),
    ]
    assert {r.decoders for r in runs} == {("gmm", "resfc")}


def test_baselines_crossed_with_seeds(tmp_path: Path):
    text = BASE + "grid: {beta: [0.1, 0.5], seed: [0, 1, 2]}\n"
    text += "baselines: [{objective: ce, noise: false}, {objective: ce_dropconnect, noise: false}]\n"
    runs = expand(load_sweep(write(tmp_path, text)))
    assert len(runs) == 2 * 3 + 2 * 3
    assert [(r.objective, r.seed, r.noise) for r in runs[6:]] == [
        (obj, seed, False) for obj in ("ce", "ce_dropconnect") for seed in (0, 1, 2)
    ]


def test_a_list_in_a_baselines_entry_is_its_own_axis(tmp_path: Path):
    path = write(tmp_path, "name: fam\nbase: {dataset: digits, encoder: mlp, batch_size: 100, decoders: [gmm]}\n"
                 "grid: {beta: [0.1, 0.5], seed: [0, 1]}\n"
                 "baselines:\n  - {objective: vib, beta: [0.001, 0.01, 0.1]}\n  - {objective: ce}\n"
                 "  - {objective: ce, decoders: [[gmm], [gmm, logreg]]}\n")  # fmt: skip
    runs = expand(load_sweep(path))
    by = {}
    for cfg in runs:
        by.setdefault(cfg.objective, []).append(cfg)
    assert len(by["ib"]) == 4 and all(cfg.noise for cfg in by["ib"])
    assert sorted((c.beta, c.seed) for c in by["vib"]) == [(b, s) for b in (0.001, 0.01, 0.1) for s in (0, 1)]
    assert not any(c.noise for c in by["vib"] + by["ce"])  # each objective's own noise default
    assert sorted({c.decoders for c in by["ce"]}) == [("gmm",), ("gmm", "logreg")]  # 2 distinct ce configs × 2
    assert len(by["ce"]) == 4  # {objective: ce} and {…, decoders: [[gmm], …]} coincide on [gmm]: one run per seed
    bad = write(tmp_path, "name: fam\nbase: {dataset: digits, encoder: mlp, batch_size: 100}\n"
                "baselines:\n  - {objective: vib, beta: []}\n", "bad.yaml")  # fmt: skip
    with pytest.raises(ConfigError, match=r"baselines\[0\]\.beta: an empty list"):
        load_sweep(bad)
    out_of_range = write(tmp_path, "name: fam\nbase: {dataset: digits, encoder: mlp, batch_size: 100}\n"
                         "baselines:\n  - {objective: ib, beta: [0.5, 1.0]}\n", "range.yaml")  # fmt: skip
    with pytest.raises(ConfigError, match=r"baselines\[0\]\.beta: β'' = 1.0"):
        load_sweep(out_of_range)


def test_baselines_without_seed_axis_use_base_seed(tmp_path: Path):
    text = BASE.replace("k: 3}", "k: 3, seed: 7}") + "grid: {beta: [0.1, 0.5]}\nbaselines: [{objective: ce}]\n"
    runs = expand(load_sweep(write(tmp_path, text)))
    assert [(r.objective, r.seed) for r in runs] == [("ib", 7), ("ib", 7), ("ce", 7)]


def test_no_grid_is_one_run(tmp_path: Path):
    runs = expand(load_sweep(write(tmp_path, BASE)))
    assert len(runs) == 1 and runs[0].dataset == "digits"


def test_set_overrides_reach_base():
    path = ROOT / "sweeps" / "quickstart.yaml"
    plain = load_sweep(path)
    spec = load_sweep(path, ["epochs=2", "decoders=[gmm,logreg]"])
    assert spec.base_dict["epochs"] == 2
    runs = expand(spec)
    assert len(runs) == len(expand(plain))
    assert {(r.epochs, r.decoders) for r in runs} == {(2, ("gmm", "logreg"))}
    assert not {results.run_id(r) for r in runs} & {results.run_id(r) for r in expand(plain)}
    assert spec_to_dict(spec)["base"]["epochs"] == 2  # what a sweep folder records is the spec as run
    with pytest.raises(ConfigError, match=r"^--set: betta: unknown field; allowed: .*beta"):
        load_sweep(path, ["betta=0.3"])


def test_plan_reads_states_from_disk(tmp_path: Path):
    spec = load_sweep(ROOT / "sweeps" / "quickstart.yaml")
    planned = plan(spec, tmp_path)
    assert {p.state for p in planned} == {"new"}
    (planned[0].run_dir).mkdir(parents=True)
    (planned[0].run_dir / "DONE").write_text("")
    assert [p.state for p in plan(spec, tmp_path)] == ["done"] + ["new"] * (len(planned) - 1)


# -- malformed sweep files ---------------------------------------------------------------------------------------

SEARCH = "search: {algorithm: optuna, space: {beta: {uniform: [0.0, 0.9]}}}\n"

# id -> (file text, the field the error names, text of what is allowed, or None where nothing is)
MALFORMED = {
    "unknown_top_level_key": (BASE + "grids: {beta: [0.1]}\n", "grids", "name, base, grid"),
    "unknown_base_field": ("name: bad\nbase: {dataset: digits, betta: 0.3}\n", "base.betta", "beta"),
    "base_wrong_type": ("name: bad\nbase: {dataset: digits, epochs: ten}\n", "base.epochs", "an integer"),
    "grid_key_not_a_field": (BASE + "grid: {gamma: [1, 2]}\n", "grid.gamma", "beta"),
    "grid_empty_list": (BASE + "grid: {beta: []}\n", "grid.beta", "[0.0, 0.3, 0.6]"),
    "grid_value_not_a_list": (BASE + "grid: {beta: 0.3}\n", "grid.beta", "[0.0, 0.3, 0.6]"),
    "grid_beta_out_of_range": (BASE + "grid: {beta: [0.5, 1.5]}\n", "grid.beta", "0 ≤ beta < 1"),
    "grid_decoder_unknown": (BASE + "grid: {decoder: [gmm, knn]}\n", "grid.decoder", "gmm, logreg, resfc"),
    "grid_k_too_large_for_batch": (BASE + "grid: {k: [3, 10]}\n", "grid.k", "more than k samples per class"),
    "grid_decoder_and_decoders": (BASE + "grid: {decoder: [gmm], decoders: [[gmm]]}\n", "grid.decoder", None),
    "name_escapes": (BASE.replace("name: bad", "name: ../escape"), "name", "lower-case letters"),
    "name_upper_case": (BASE.replace("name: bad", "name: Upper"), "name", "lower-case letters"),
    "name_missing": (BASE.replace("name: bad\n", ""), "name", "lower-case letters"),
    "name_trailing_newline": (BASE.replace("name: bad", 'name: "bad\\n"'), "name", "lower-case letters"),
    "duplicate_key": (BASE + "grid: {beta: [0.1]}\ngrid: {k: [1]}\n", "line 4", None),
    "grid_over_max_runs": (BASE + "max_runs: 5\ngrid: {beta: [0.1, 0.2, 0.3], seed: [0, 1]}\n", "grid", "at most 5"),
    "max_runs_zero": (BASE + "max_runs: 0\n", "max_runs", "an integer ≥ 1"),
    "search_metric_typo": (BASE + SEARCH.replace("}}}", "}}, metric: val_acc/gmn}"), "search.metric", "val_acc/gmm"),
    "search_metric_not_every_objective": (
        BASE + SEARCH.replace("}}}", "}, objective: {choice: [ib, ce]}}, metric: train/h_z}"),
        "search.metric",
        "val_acc/gmm",
    ),
    "search_metric_on_the_test_set": (
        BASE + SEARCH.replace("}}}", "}}, metric: test_acc/gmm}"),
        "search.metric",
        "val_acc/gmm, val_h_y_given_z",
    ),
    "search_seed_too_large": (BASE + SEARCH.replace("}}}", "}}, seed: 4294967296}"), "search.seed", "4294967295"),
    "baselines_not_a_list": (BASE + "baselines: {objective: ce}\n", "baselines", "[{objective: ce}]"),
    "baseline_unknown_field": (BASE + "baselines: [{objectiv: ce}]\n", "baselines[0].objectiv", "objective"),
    "baseline_unknown_objective": (BASE + "baselines: [{objective: mse}]\n", "baselines[0].objective", "ce"),
    "search_algorithm": (BASE + SEARCH.replace("optuna", "hyperopt"), "search.algorithm", "optuna"),
    "search_domain": (BASE + SEARCH.replace("uniform", "normal"), "search.space.beta", "uniform"),
    "search_reversed": (BASE + SEARCH.replace("[0.0, 0.9]", "[0.9, 0.1]"), "search.space.beta.uniform", "lo < hi"),
    "search_beta_endpoint": (BASE + SEARCH.replace("0.9]", "1.5]"), "search.space.beta", "0 ≤ beta < 1"),
    "search_not_a_field": (BASE + SEARCH.replace("beta:", "gamma:"), "search.space.gamma", "beta"),
    "search_scheduler": (BASE + SEARCH.replace("}}}", "}}, scheduler: pbt}"), "search.scheduler", "none, asha"),
    "search_with_grid": (BASE + SEARCH + "grid: {seed: [0, 1]}\n", "search", "either grid/baselines or search"),
    "resources_unknown_key": (BASE + "resources: {cpus: 2}\n", "resources.cpus", "cpu, gpu"),
    "resources_negative_gpu": (BASE + "resources: {gpu: -1}\n", "resources.gpu", "a number ≥ 0"),
    "resources_zero_cpu": (BASE + "resources: {cpu: 0}\n", "resources.cpu", "a number ≥ 0.01"),
    "max_concurrent_zero": (BASE + "max_concurrent: 0\n", "max_concurrent", "an integer ≥ 1"),
    "yaml_syntax": ("name: bad\nbase: {dataset: digits\n", "line 3", None),
    "empty_file": ("", "(top level)", "name, base, grid"),
    "top_level_list": ("- name: bad\n", "(top level)", "name, base, grid"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=str)
def test_malformed_sweep(tmp_path: Path, case: str):
    text, field, allowed = MALFORMED[case]
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}: "), message
    assert "\n" not in message
    if allowed is not None:
        assert "; allowed: " in message and allowed in message.split("; allowed: ", 1)[1], message


def test_the_default_cap_refuses_a_huge_grid_before_building_it(tmp_path: Path):
    axes = ", ".join(f"{k}: [{', '.join(str(i) for i in range(1, 12))}]" for k in ("seed", "k", "latent_dim", "epochs"))
    path = write(tmp_path, BASE + f"grid: {{{axes}, beta: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}}\n")
    with pytest.raises(ConfigError, match=r": grid: 131769 runs exceed max_runs = 100000; allowed: at most 100000"):
        load_sweep(path)  # 131769 configs would take minutes to build; the refusal is immediate
    raised = write(tmp_path, BASE + "max_runs: 6\ngrid: {beta: [0.1, 0.2, 0.3], seed: [0, 1]}\n", "raised.yaml")
    assert len(expand(load_sweep(raised))) == 6  # the cap is the sweep file's to raise
    assert spec_to_dict(load_sweep(raised))["max_runs"] == 6  # and sweep.yaml keeps it, for status and reruns
    with pytest.raises(ConfigError, match=r": grid: 6 runs exceed max_runs = 5"):
        load_sweep(raised, max_runs=5)  # ibbench sweep --max-runs 5


def test_a_search_metric_reported_by_every_trial_is_accepted(tmp_path: Path):
    text = BASE + SEARCH.replace("}}}", "}, objective: {choice: [ib, ce]}}, metric: val_acc/gmm}")
    assert load_sweep(write(tmp_path, text)).search.metric == "val_acc/gmm"


def test_missing_sweep_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"^.*nope\.yaml: \(file\): cannot read"):
        load_sweep(path)


# -- ibbench sweep --dry-run -------------------------------------------------------------------------------------


@pytest.fixture
def wide_console(monkeypatch):
    """A console wide enough that no table cell is cut, writing to the (captured) sys.stdout."""
    monkeypatch.setattr(cli, "console", Console(width=250, color_system=None))


def test_dry_run_lists_every_run(tmp_path: Path, capsys, wide_console):
    spec_path = ROOT / "sweeps" / "quickstart.yaml"
    out = tmp_path / "runs"
    assert cli.main(["sweep", str(spec_path), "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    runs = expand(load_sweep(spec_path))
    assert f"{len(runs)} runs: {len(runs)} new" in text
    for cfg in runs:
        assert results.run_id(cfg) in text
    assert text.count(" new ") >= len(runs)  # one state cell per run
    assert not out.exists()  # a dry run writes nothing

    # --set reaches the runs: other run_ids; a finished run shows as done.
    planned = plan(load_sweep(spec_path, ["epochs=2"]), out)
    planned[0].run_dir.mkdir(parents=True)
    (planned[0].run_dir / "DONE").write_text("")
    assert cli.main(["sweep", str(spec_path), "--dry-run", "--out", str(out), "--set", "epochs=2"]) == 0
    text = capsys.readouterr().out
    assert f"{len(runs)} runs: 1 done, {len(runs) - 1} new" in text
    assert all(p.run_id in text for p in planned)


@pytest.mark.parametrize("sweep", ["quickstart", "optuna_beta_k"])
def test_a_dry_run_never_imports_ray(tmp_path: Path, sweep: str):
    """In a fresh interpreter, so that no earlier test's import of Ray can hide one."""
    script = textwrap.dedent(
        f"""
        import sys
        from ibbench import cli
        code = cli.main(["sweep", {str(ROOT / "sweeps" / f"{sweep}.yaml")!r}, "--dry-run", "--out", {str(tmp_path)!r}])
        print("exit", code, "ray imported:", sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "exit 0 ray imported: []" in proc.stdout, proc.stdout[-500:]
    assert not list(tmp_path.iterdir())  # and writes nothing


def test_dry_run_search(tmp_path: Path, capsys, wide_console):
    path = ROOT / "sweeps" / "optuna_beta_k.yaml"
    assert cli.main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "runs")]) == 0
    text = capsys.readouterr().out
    assert "32" in text and "val_acc/gmm" in text


@pytest.mark.parametrize("case", ["name_escapes", "grid_beta_out_of_range", "yaml_syntax", "empty_file"])
def test_dry_run_malformed_exits_2(tmp_path: Path, capsys, case: str):
    text, field, _ = MALFORMED[case]
    path = write(tmp_path, text)
    assert cli.main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "runs")]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}: {field}: "), lines[0]
    assert not (tmp_path / "runs").exists()


def test_dry_run_bad_set_exits_2(tmp_path: Path, capsys):
    path = ROOT / "sweeps" / "quickstart.yaml"
    assert cli.main(["sweep", str(path), "--dry-run", "--out", str(tmp_path), "--set", "betta=0.3"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --set: betta: unknown field"), lines


# -- pre-flight checks: before Ray starts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field, needle",
    [
        ({"resources": {"cpu": 4096}}, "resources.cpu", "4096 CPUs per trial, but this machine has"),
        ({"resources": {"cpu": 1, "gpu": 1}}, "resources.gpu", "1 GPU per trial, but this machine has 0"),
        ({"base": {"dataset": "cifar10", "data_dir": "<empty>", "epochs": 1}}, "data_dir", "CIFAR-10 not found"),
    ],
    ids=["cpu", "gpu", "cifar10_missing"],
)
def test_preflight_refuses_before_ray_starts(tmp_path: Path, changes: dict, field: str, needle: str):
    if field == "resources.gpu" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    spec = {"name": "pre", "base": {"dataset": "digits", "encoder": "mlp", "epochs": 1, "batch_size": 100},
            "grid": {"beta": [0.1]}}  # fmt: skip
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value} if key == "base" else value
    if spec["base"].get("data_dir") == "<empty>":
        (tmp_path / "empty").mkdir()
        spec["base"]["data_dir"] = str(tmp_path / "empty")
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "runs"
    # The real command in a fresh process: a check that came after Ray's start would leave Ray's files behind.
    proc = subprocess.run([str(Path(sys.executable).parent / "ibbench"), "sweep", str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and f": {field}: " in lines[0], lines
    assert not (out / "pre" / ".ray").exists() and not list(out.glob("pre/*/config.json"))
