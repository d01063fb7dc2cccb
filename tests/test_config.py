"""RunConfig: the paper's defaults, typing and coercion, the loader, and one-line errors naming the field."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from ibbench import config
from ibbench.config import RunConfig, load_run_config, parse_overrides, read_yaml
from ibbench.errors import ConfigError

FIELDS = [f.name for f in dataclasses.fields(RunConfig)]


def test_defaults_are_the_papers_recipe():
    cfg = RunConfig()
    assert (cfg.dataset, cfg.encoder, cfg.latent_dim, cfg.objective) == ("cifar10", "resnet18", 256, "ib")
    assert cfg.lr == 5e-4
    assert cfg.lr_patience == 10
    assert cfg.epochs == 150
    assert cfg.noise is True
    assert cfg.fgsm_eps == pytest.approx((0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255))
    assert cfg.batch_size % 10 == 0 and cfg.batch_size // 10 > cfg.k  # class-balanced on CIFAR-10
    cfg.validate()  # the defaults are a valid run


def test_attack_settings_have_strong_defaults():
    cfg = RunConfig()
    assert cfg.attacks[0] == "fgsm"  # the paper's, kept for reproduction
    assert {"fgsm_margin", "pgd_margin", "apgd_ce", "apgd_dlr", "square"} <= set(cfg.attacks)
    assert cfg.pgd_steps >= 10 and cfg.apgd_steps == 100 and cfg.square_queries >= 1000
    assert cfg.attack_images == 1000 and cfg.eot_draws == 0
    assert RunConfig.from_dict({"pgd_steps": 3}).pgd_steps == 3


def test_design_fields_exist():
    for name in (
        "dataset data_dir encoder latent_dim objective beta noise k decoders epochs batch_size lr "
        "lr_patience seed eval_every fgsm_eps device"
    ).split():
        assert name in FIELDS


def test_every_field_has_a_why_comment():
    source = inspect.getsource(config)
    lines = source.splitlines()
    (cls,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "RunConfig"]
    declared = [n for n in cls.body if isinstance(n, ast.AnnAssign)]
    assert [n.target.id for n in declared] == FIELDS
    for node in declared:
        line = lines[node.lineno - 1]
        assert "#" in line and line.split("#", 1)[1].strip(), f"field {node.target.id} has no comment: {line!r}"


def test_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 0.5  # type: ignore[misc]


def test_from_dict_coerces():
    cfg = RunConfig.from_dict(
        {"beta": 0, "lr": 1, "fgsm_eps": [0, 1], "decoders": ["gmm", "resfc"], "epochs": 3.0, "dropconnect": 0}
    )
    assert isinstance(cfg.beta, float) and cfg.beta == 0.0
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0
    assert cfg.fgsm_eps == (0.0, 1.0) and all(isinstance(e, float) for e in cfg.fgsm_eps)
    assert cfg.decoders == ("gmm", "resfc")
    assert isinstance(cfg.epochs, int) and cfg.epochs == 3
    assert RunConfig.from_dict({"data_dir": None}).data_dir is None
    hash(cfg)  # tuples, not lists: configs are hashable


def test_parse_overrides_types():
    got = parse_overrides(["beta=0.3", "noise=false", "decoders=[gmm,resfc]", "k=3", "dataset=digits", "lr=1e-3"])
    assert got == {"beta": 0.3, "noise": False, "decoders": ["gmm", "resfc"], "k": 3, "dataset": "digits", "lr": 1e-3}
    assert isinstance(got["k"], int) and isinstance(got["beta"], float) and isinstance(got["lr"], float)
    cfg = load_run_config(None, ["beta=0.3", "noise=false", "decoders=[gmm,resfc]", "k=3"])
    assert (cfg.beta, cfg.noise, cfg.decoders, cfg.k) == (0.3, False, ("gmm", "resfc"), 3)


def test_load_run_config_file_and_overrides(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: digits\nencoder: mlp\nbeta: 0.2\nlr: 1e-3\ndecoders: [gmm, logreg]\n")
    cfg = load_run_config(path, ["beta=0.05", "seed=7"])
    assert (cfg.dataset, cfg.encoder, cfg.beta, cfg.seed, cfg.lr) == ("digits", "mlp", 0.05, 7, 1e-3)
    assert cfg.decoders == ("gmm", "logreg")
    assert load_run_config(path, {"k": 2}).k == 2
    assert load_run_config(None) == RunConfig()
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_run_config(empty) == RunConfig()


def test_roundtrip_and_replace():
    cfg = RunConfig(dataset="digits", encoder="mlp", decoders=("gmm", "resfc"), fgsm_eps=(0.0, 0.1))
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["decoders"] == ["gmm", "resfc"]
    changed = cfg.replace(beta=0.4, decoders=["logreg"])
    assert (changed.beta, changed.decoders, changed.dataset) == (0.4, ("logreg",), "digits")
    assert cfg.beta == 0.1  # the original is untouched
    with pytest.raises(ConfigError, match=r"^here: beta: "):
        cfg.replace("here", beta=1.0)


# (YAML text, field, substrings the message must hold: what is allowed)
BAD = {
    "unknown_key": ("betta: 0.3\n", "betta", ["unknown field", "allowed:", "beta", "latent_dim", "fgsm_eps"]),
    "numeric_key": ("1: 2\nfoo: 3\n", "1", ["unknown field", "allowed:"]),
    "string_for_int": ("epochs: ten\n", "epochs", ["'ten'", "integer"]),
    "float_for_int": ("k: 2.5\n", "k", ["2.5", "integer"]),
    "yes_string_for_bool": ('noise: "yes"\n', "noise", ["'yes'", "true, false"]),
    "int_for_bool": ("noise: 1\n", "noise", ["true, false"]),
    "string_for_list": ("decoders: gmm\n", "decoders", ["list"]),
    "nan_lr": ("lr: .nan\n", "lr", ["finite"]),
    "beta_one": ("beta: 1.0\n", "beta", ["1.0", "0 ≤ beta < 1"]),
    "beta_negative": ("beta: -0.1\n", "beta", ["-0.1", "0 ≤ beta < 1"]),
    "k_zero": ("k: 0\n", "k", ["≥ 1"]),
    "epochs_zero": ("epochs: 0\n", "epochs", ["≥ 1"]),
    "unknown_encoder": ("encoder: vit\n", "encoder", ["'vit'", "cnn, mlp, resnet18"]),
    "unknown_dataset": ("dataset: mnist\n", "dataset", ["'mnist'", "cifar10, digits, synthetic"]),
    "unknown_objective": ("objective: vae\n", "objective", ["'vae'", "ce, ce_dropconnect, ib, nlib, vib"]),
    "unknown_decoder": ("decoders: [gmm, knn]\n", "decoders", ["'knn'", "gmm, logreg, resfc"]),
    "empty_decoders": ("decoders: []\n", "decoders", ["gmm, logreg, resfc"]),
    "duplicate_decoder": ("decoders: [gmm, gmm]\n", "decoders", ["twice"]),
    "batch_not_multiple": ("batch_size: 505\n", "batch_size", ["multiple", "10 classes"]),
    "batch_not_multiple_ce": ("objective: ce\nbatch_size: 64\n", "batch_size", ["multiple"]),
    "batch_too_small_for_k": ("batch_size: 20\nk: 2\n", "batch_size", ["k = 2", "more than k", ">= 30"]),
    "negative_lr": ("lr: -0.001\n", "lr", ["> 0"]),
    "eps_above_one": ("fgsm_eps: [0.0, 8]\n", "fgsm_eps", ["[0, 1]"]),
    "eps_negative": ("fgsm_eps: [-0.1]\n", "fgsm_eps", ["[0, 1]"]),
    "unknown_attack": ("attacks: [fgsm, cw]\n", "attacks", ["'cw'", "apgd_dlr", "square"]),
    "no_attacks": ("attacks: []\n", "attacks", ["fgsm"]),
    "duplicate_attack": ("attacks: [fgsm, fgsm]\n", "attacks", ["twice"]),
    "pgd_steps_zero": ("pgd_steps: 0\n", "pgd_steps", ["≥ 1"]),
    "pgd_restarts_zero": ("pgd_restarts: 0\n", "pgd_restarts", ["≥ 1"]),
    "pgd_step_size_zero": ("pgd_step_size: 0\n", "pgd_step_size", ["> 0"]),
    "apgd_steps_zero": ("apgd_steps: 0\n", "apgd_steps", ["≥ 1"]),
    "square_queries_zero": ("square_queries: 0\n", "square_queries", ["≥ 1"]),
    "attack_images_zero": ("attack_images: 0\n", "attack_images", ["≥ 1"]),
    "attack_seed_negative": ("attack_seed: -1\n", "attack_seed", ["≥ 0"]),
    "eot_negative": ("eot_draws: -2\n", "eot_draws", ["EOT"]),
    "unknown_device": ("device: tpu\n", "device", ["'tpu'", "auto, cpu, cuda"]),
    "dropconnect_one": ("dropconnect: 1.0\n", "dropconnect", ["[0, 1)"]),
    "negative_seed": ("seed: -1\n", "seed", ["≥ 0"]),
    "seed_2_64": ("seed: 18446744073709551616\n", "seed", ["too large", "4294967295"]),
    "seed_2_32": ("seed: 4294967296\n", "seed", ["too large", "4294967295"]),
    "duplicate_key": ("beta: 0.1\nk: 2\nbeta: 0.5\n", "line 3", ["duplicate key 'beta' (first on line 1)"]),
    "unknown_amp": ("amp: fp8\n", "amp", ["off, bf16"]),
    "checkpoint_every_negative": ("checkpoint_every_s: -60\n", "checkpoint_every_s", ["negative", "0: every epoch"]),
    "checkpoint_every_inf": ("checkpoint_every_s: .inf\n", "checkpoint_every_s", ["finite"]),
    "yaml_syntax": ("beta: 0.1\nk: [1, 2\nseed: 0\n", "line", ["invalid YAML"]),
    "top_level_list": ("- beta: 0.1\n", "(top level)", ["mapping", "list"]),
    "top_level_scalar": ("just a string\n", "(top level)", ["mapping", "str"]),
}


@pytest.mark.parametrize("text, field, needles", list(BAD.values()), ids=list(BAD))
def test_bad_config_file(tmp_path: Path, text: str, field: str, needles: list[str]):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    message = str(info.value)
    assert re.match(rf"^{re.escape(str(path))}: {re.escape(field)}.*?: .+", message), message
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} missing from {message!r}"


def test_yaml_syntax_error_names_the_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("beta: 0.1\nseed: 0\nk: [1, 2\nlr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: line \d+: invalid YAML"):
        load_run_config(path)


def test_largest_seed_every_consumer_accepts_is_valid():
    assert RunConfig.from_dict({"seed": 2**32 - 1}).seed == 2**32 - 1


def test_duplicate_keys_in_nested_mappings_are_refused_and_merges_are_not(tmp_path: Path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: x\nbase:\n  k: 1\n  epochs: 2\n  k: 3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: line 5: invalid YAML: duplicate key 'k'"):
        read_yaml(path)
    path.write_text("a: &a {k: 1, beta: 0.1}\nb: {<<: *a, k: 2}\n")
    assert read_yaml(path)["b"] == {"k": 2, "beta": 0.1}  # overriding a merged key is what merges are for


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: \(file\): cannot read"):
        load_run_config(path)


def test_from_dict_errors_name_the_source():
    with pytest.raises(ConfigError, match=r"^trial 3: k: .*≥ 1"):
        RunConfig.from_dict({"k": 0}, "trial 3")
    with pytest.raises(ConfigError, match=r"^trial 3: \(top level\): "):
        RunConfig.from_dict([1, 2], "trial 3")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "items, pattern",
    [
        (["betta=0.3"], r"^--set: betta: unknown field; allowed: .*beta"),
        (["beta"], r"^--set: beta: expected key=value"),
        (["=3"], r"^--set: =3: expected key=value"),
        (["k=[1"], r"^--set: k: cannot parse value"),
        (["k=0"], r"^<defaults>: k: "),
    ],
)
def test_bad_overrides(items: list[str], pattern: str):
    with pytest.raises(ConfigError, match=pattern):
        load_run_config(None, items)


def test_override_error_names_the_file(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: digits\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: beta: "):
        load_run_config(path, ["beta=2"])
