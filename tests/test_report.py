"""ibbench report: tables against a direct pandas computation, every file written, partial sweeps.

tests/fixtures/report_sweep is a real tiny sweep (digits, mlp, latent 8, 3 epochs; β'' {0.05, 0.9} × noise × seeds
{0, 1}, decoders gmm and logreg, CE and CE+DropConnect baselines), its checkpoints, locks and .ray removed.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import shutil
import struct
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from run_files import raw_runs

from ibbench import cli, report, results, train
from ibbench.config import RunConfig

FIXTURE = Path(__file__).parent / "fixtures" / "report_sweep"
ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"
TABLES = ("accuracy", "robustness", "robustness_attacks", "masking", "infoplane", "unfinished")
FIGURES = {"fig1_robustness": (800, 500), "fig2_infoplane": (1200, 500), "fig3_generalization": (800, 500)}
BASELINES = ("ce", "ce_dropconnect")


def _key(config: dict) -> tuple:
    """The grouping the brief specifies: baselines by objective; IB by β'', noise and k (all else is fixed here)."""
    if config["objective"] in BASELINES:
        return (config["objective"], None, None, None)
    return (config["objective"], config["beta"], config["noise"], config["k"])


def _table_key(row: pd.Series) -> tuple:
    return tuple(None if report.is_missing(row[c]) else row[c] for c in ("objective", "beta", "noise", "k"))


def _expected(frame: pd.DataFrame, by: list[str], values: list[str]) -> pd.DataFrame:
    grouped = frame.groupby(by, dropna=False)[values]
    means, sems, counts = grouped.mean(), grouped.sem(ddof=1), grouped.count()
    sems.columns = [f"{c}_se" for c in sems.columns]
    return means.join(sems).join(counts[[values[0]]].rename(columns={values[0]: "n"}))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("report")
    return out, report.write_report(FIXTURE, out)


def test_fixture_is_small_and_clean():
    files = [p for p in FIXTURE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 400_000
    assert not [p for p in files if p.name in ("checkpoint.pt", ".lock") or ".ray" in p.parts]
    assert len(raw_runs(FIXTURE)) == 12


def test_accuracy_table_equals_pandas():
    rows = []
    for run in raw_runs(FIXTURE):
        final = run["summary"]["final"]
        for decoder in ("gmm", "logreg", "head"):
            if f"test_acc/{decoder}" in final:
                test, train = final[f"test_acc/{decoder}"], final[f"train_acc/{decoder}"]
                rows.append((*_key(run["config"]), decoder, test, train, train - test))
    raw = pd.DataFrame(rows, columns=["objective", "beta", "noise", "k", "decoder", "test", "train", "gap"])
    raw[["beta", "noise", "k"]] = raw[["beta", "noise", "k"]].astype(object).fillna("-")
    expected = _expected(raw, ["objective", "beta", "noise", "k", "decoder"], ["test", "train", "gap"])

    table = report.accuracy_table(results.load_runs(FIXTURE))
    assert len(table.frame) == len(expected) == 4 * 2 + 2 * 3  # IB configs × 2 decoders; baselines × 3 (head)
    for _, row in table.frame.iterrows():
        key = tuple("-" if v is None else v for v in _table_key(row))
        want = expected.loc[(*key, row["decoder"])]
        assert row["n"] == want["n"] == 2
        for ours, theirs in (("test_acc", "test"), ("train_acc", "train"), ("gap", "gap")):
            assert row[ours] == pytest.approx(want[theirs], abs=1e-12)
            assert row[f"{ours}_se"] == pytest.approx(want[f"{theirs}_se"], abs=1e-12)
    baselines = table.frame[table.frame["objective"].isin(BASELINES)]
    assert set(baselines["decoder"]) == {"gmm", "logreg", "head"}
    assert baselines[["beta", "noise", "k"]].isna().all().all()


def test_robustness_tables_equal_pandas_on_old_runs():
    """The fixture's runs predate the attack suite: FGSM only; the worst case shows as missing, never invented."""
    rows = []
    for run in raw_runs(FIXTURE):
        for decoder, attacks in run["summary"]["robustness"].items():
            curve = attacks["fgsm"]
            xs = np.array(sorted(float(e) for e in curve))
            ys = np.array([curve[f"{e:.6g}"] for e in xs])
            auc = np.trapezoid(ys, xs) / (xs[-1] - xs[0])
            rows.append((*_key(run["config"]), decoder, *ys, auc))
    values = ["a0", "a1", "a2", "auc"]
    raw = pd.DataFrame(rows, columns=["objective", "beta", "noise", "k", "decoder", *values])
    raw[["beta", "noise", "k"]] = raw[["beta", "noise", "k"]].astype(object).fillna("-")
    expected = _expected(raw, ["objective", "beta", "noise", "k", "decoder"], values)

    runs = results.load_runs(FIXTURE)
    table = report.attack_table(runs)
    assert [m.label for m in table.metrics] == ["ε=0", "ε=0.02", "ε=0.05", "AUC"]
    assert len(table.frame) == len(expected) and set(table.frame["attack"]) == {"fgsm"}
    for _, rows_of in table.frame.groupby("decoder"):
        assert rows_of["auc"].is_monotonic_decreasing  # ordered by AUC within (attack, decoder)
    for _, row in table.frame.iterrows():
        key = tuple("-" if v is None else v for v in _table_key(row))
        want = expected.loc[(*key, row["decoder"])]
        for metric, theirs in zip(table.metrics, values, strict=True):
            assert row[metric.column] == pytest.approx(want[theirs], abs=1e-12)
            assert row[f"{metric.column}_se"] == pytest.approx(want[f"{theirs}_se"], abs=1e-12)

    main = report.robustness_table(runs)
    assert [m.label for m in main.metrics] == ["ε=0", "ε=0.02", "ε=0.05", "worst AUC", "FGSM AUC (paper)",
                                              "zero-grad share"]  # fmt: skip
    assert len(main.frame) == len(expected)
    assert main.frame["auc"].isna().all() and main.frame["rank"].isna().all()  # no worst case: not ranked
    for _, row in main.frame.iterrows():
        key = tuple("-" if v is None else v for v in _table_key(row))
        assert row["fgsm_auc"] == pytest.approx(expected.loc[(*key, row["decoder"])]["auc"], abs=1e-12)
    md = report.table_markdown(main)
    assert "| gmm | – | CE | – | – | – | – | 2 | – |" in md  # missing attacks show as "–"


def test_infoplane_table_equals_pandas():
    """The fixture predates the validation split: its best epochs are unknown ("–"), never chosen by the test set."""
    rows = []
    for run in raw_runs(FIXTURE):
        m = pd.DataFrame(run["metrics"]).sort_values("epoch")
        assert "val_h_y_given_z" not in m
        final = m.iloc[-1]
        rows.append(
            (
                *_key(run["config"]),
                final["infoplane/i_xz"],
                final["infoplane/h_y_given_z"],
                math.nan,  # in-sample H[Y|Z] and noise-free H[Z]: not measured then
                math.nan,
                math.nan,  # the best epoch and its values: no validation estimate to choose by
                math.nan,
                math.nan,
            )
        )
    values = list(report.INFOPLANE_VALUES)
    raw = pd.DataFrame(rows, columns=["objective", "beta", "noise", "k", *values])
    raw[["beta", "noise", "k"]] = raw[["beta", "noise", "k"]].astype(object).fillna("-")
    expected = _expected(raw, ["objective", "beta", "noise", "k"], values)

    table = report.infoplane_table(results.load_runs(FIXTURE), results.load_metrics(FIXTURE))
    assert len(table.frame) == len(expected) == 6
    for _, row in table.frame.iterrows():
        want = expected.loc[tuple("-" if v is None else v for v in _table_key(row))]
        for value in values:
            assert row[value] == pytest.approx(want[value], abs=1e-12, nan_ok=True)
            assert row[f"{value}_se"] == pytest.approx(want[f"{value}_se"], abs=1e-12, nan_ok=True)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_every_file_is_written(written):
    out, paths = written
    names = {p.name for p in paths}
    expected = {"report.md", "report.html"}
    expected |= {f"{t}.{ext}" for t in TABLES for ext in ("csv", "tex")}
    expected |= {f"{f}.{ext}" for f in FIGURES for ext in ("png", "pdf")}
    assert names == expected
    assert all((out / name).stat().st_size > 0 for name in names)
    for name, size in FIGURES.items():
        data = (out / f"{name}.png").read_bytes()
        assert _png_size(data) == size
        from matplotlib.image import imread

        pixels = imread(out / f"{name}.png")
        assert pixels.shape[:2] == (size[1], size[0]) and pixels[..., :3].std() > 0.05  # not a blank image
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    tex = (out / "accuracy.tex").read_text()
    assert "\\begin{tabular}" in tex and "$\\pm$" in tex and "\\textbf{" in tex
    csv = pd.read_csv(out / "accuracy.csv")
    assert {"test_acc", "test_acc_se", "n", "decoder"} <= set(csv.columns)


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_html_is_self_contained(written):
    out, _ = written
    text = (out / "report.html").read_text()
    ET.fromstring(text.split("\n", 1)[1])  # well-formed (after the doctype line)
    parser = _Collector()
    parser.feed(text)
    # accuracy, robustness, per attack, information plane; no masking diagnostics (old runs), no unfinished runs
    assert len(parser.images) == 3 and parser.tags.count("table") == 4
    sizes = sorted(_png_size(base64.b64decode(src.split(",", 1)[1])) for src in parser.images)
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert sizes == sorted(FIGURES.values())
    assert "href=" not in text and "<script" not in text
    assert "biased" in text and "relative" in text  # the estimator's caveat
    assert "worst case over a suite" in text and "saturates" in text  # how robustness is measured, and why


def test_markdown_has_tables_figures_and_caveat(written):
    out, _ = written
    md = (out / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name}.png)" in md
    assert "| objective | β'' | noise | k | decoder | n | test acc | ± |" in md
    assert "| CE+DropConnect | – | – | – | head | 2 |" in md
    assert "**" in md  # best values marked
    assert "Caveat" in md and "d ≥ 64" in md and "relative" in md
    assert "None: all 12 runs finished." in md


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "report_sweep"
    shutil.copytree(FIXTURE, root)
    return root


def test_failed_and_incomplete_runs_are_listed(tmp_path):
    root = _copy(tmp_path)
    failed, incomplete = root / "54a8546b4335", root / "725bb2338027"  # the two seeds of IB β''=0.05 with noise
    (failed / "DONE").unlink()
    reason = "non-finite loss (nan) in epoch 2, batch 3"
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "reason": reason, "epochs_done": 1}))
    (incomplete / "DONE").unlink()
    (incomplete / "summary.json").unlink()
    lines = (incomplete / "metrics.jsonl").read_text().splitlines()
    (incomplete / "metrics.jsonl").write_text(lines[0] + "\n")
    scratch = root / ".ray" / "trial_0"  # Ray's scratch and sweep.yaml are not runs
    scratch.mkdir(parents=True)
    (scratch / "config.json").write_text("{}")

    out = tmp_path / "out"
    assert cli.main(["report", str(root), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    section = md.split("## Runs not finished", 1)[1]
    assert "54a8546b4335" in section and "failed" in section and reason in section
    assert "725bb2338027" in section and "incomplete" in section and "1 of 3" in section
    assert "12 runs below" in md and "10 done" in md
    unfinished = pd.read_csv(out / "unfinished.csv")
    assert set(unfinished["status"]) == {"failed", "incomplete"}
    html_text = (out / "report.html").read_text()
    assert reason in html_text and "725bb2338027" in html_text
    # Neither run is in the tables: the configuration is gone (both its seeds), the rest keeps n = 2.
    accuracy = report.accuracy_table(results.load_runs(root)).frame
    ib = accuracy[accuracy["objective"] == "ib"]
    assert len(ib) == 6 and (accuracy["n"] == 2).all()
    assert not ((ib["beta"] == 0.05) & (ib["noise"] == True)).any()  # noqa: E712


def test_single_seed_shows_no_error_column_and_missing_metrics_show_dashes(tmp_path):
    root = _copy(tmp_path)
    for folder in [p for p in root.iterdir() if (p / "config.json").exists()]:
        if json.loads((folder / "config.json").read_text())["seed"] == 1:
            shutil.rmtree(folder)
    one = root / "93eff3bdcd4d"  # IB β''=0.9 with noise, seed 0: no train accuracy of gmm, no logreg curve
    summary = json.loads((one / "summary.json").read_text())
    del summary["final"]["train_acc/gmm"]
    del summary["robustness"]["logreg"]
    (one / "summary.json").write_text(json.dumps(summary))

    runs = results.load_runs(root)
    accuracy = report.accuracy_table(runs)
    assert not accuracy.show_se and (accuracy.frame["n"] == 1).all()
    assert accuracy.frame["test_acc_se"].isna().all()
    md = report.table_markdown(accuracy)
    assert "±" not in md.splitlines()[0]
    row = next(line for line in md.splitlines() if line.startswith("| IB | 0.9 | yes | 3 | gmm |"))
    assert row.split("|")[8].strip() == "–"  # train acc missing
    robustness = report.robustness_table(runs).frame
    assert not ((robustness["beta"] == 0.9) & (robustness["decoder"] == "logreg") & robustness["noise"]).any()
    assert "\\pm" not in report.table_latex(accuracy) and "±" not in report.table_html(accuracy)
    out = tmp_path / "out"
    report.write_report(root, out)
    assert "single seed" in (out / "report.md").read_text()


def test_analysis_scripts_write_their_table_or_figure(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ANALYSIS))  # as `python analysis/<script>.py` has it, for _common
    for script in sorted(ANALYSIS.glob("[!_]*.py")):
        spec = importlib.util.spec_from_file_location(script.stem, script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.main([str(FIXTURE), "--out", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {f"{t}.{ext}" for t in ("accuracy", "robustness", "infoplane") for ext in ("csv", "tex")} <= names
    assert {f"{f}.{ext}" for f in FIGURES for ext in ("png", "pdf")} <= names
    for name, size in FIGURES.items():
        assert _png_size((tmp_path / f"{name}.png").read_bytes()) == size
    assert "| objective |" in capsys.readouterr().out
    expected = report.table_csv(report.accuracy_table(results.load_runs(FIXTURE)))
    assert (tmp_path / "accuracy.csv").read_text() == expected


def test_cli_report_errors_on_an_empty_folder(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "missing")]) == 2


# End to end (a fresh sweep, then `ibbench report` on it): the README quickstart's test, test_quickstart.py.


SUITE_RUN = {
    "dataset": "digits",
    "encoder": "mlp",
    "latent_dim": 16,
    "k": 3,
    "epochs": 2,
    "batch_size": 100,
    "eval_every": 2,
    "probe_width": 16,
    "augment": False,
    "lr": 3e-3,
    "decoders": ["gmm"],
    "fgsm_eps": [0.0, 0.1, 0.3],
    "pgd_steps": 5,
    "apgd_steps": 10,
    "square_queries": 30,
    "attack_images": 100,
}


class _Saturated(torch.nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z):
        return 1000 * self.decoder(z)


@pytest.fixture(scope="module")
def suite_sweep(tmp_path_factory) -> Path:
    """A real tiny sweep in the new format: IB with noise and CE through the same GMM, the CE head, and the same CE
    model with its GMM saturated (logits × 1000), once attacked by the whole suite and once by the paper's FGSM."""
    root = tmp_path_factory.mktemp("suite") / "suite"
    train.run(RunConfig.from_dict({**SUITE_RUN, "beta": 0.05}), root / "ib")
    train.run(RunConfig.from_dict({**SUITE_RUN, "objective": "ce", "noise": False}), root / "ce")
    fit = train.fit_decoders
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "fit_decoders", lambda *a, **k: {n: _Saturated(d) for n, d in fit(*a, **k).items()})
        saturated = {**SUITE_RUN, "objective": "ce", "noise": False, "attack_seed": 7}  # its own configuration
        train.run(RunConfig.from_dict(saturated), root / "saturated")
        train.run(RunConfig.from_dict({**saturated, "attacks": ["fgsm"]}), root / "fgsm_only")
    return root


@pytest.mark.slow
def test_report_ranks_by_the_worst_case_like_for_like_and_flags_masking(suite_sweep, tmp_path):
    runs = results.load_runs(suite_sweep)
    main = report.robustness_table(runs).frame
    assert set(main["decoder"]) == {"gmm", "head"}
    gmm = main[main["decoder"] == "gmm"]
    assert set(gmm["objective"]) == {"ib", "ce"}  # IB and CE compared through the same decoder
    # the same CE encoder, saturated, attacked by the paper's FGSM only: its worst case looks masked
    flagged = gmm[gmm["check"] == "unreliable"]
    assert len(flagged) == 1 and flagged["rank"].isna().all()
    assert flagged["acc@0.3"].iloc[0] > 0.05
    ranked = gmm[gmm["check"].str.startswith("ok")]
    assert gmm["check"].str.contains("CE attacks blind").sum() == 1  # the saturated GMM under the full suite
    assert sorted(ranked["rank"]) == list(range(1, len(ranked) + 1))
    assert list(ranked.sort_values("rank")["auc"]) == sorted(ranked["auc"], reverse=True)
    for _, row in ranked.iterrows():
        assert row["auc"] <= row["fgsm_auc"] + 1e-12  # the worst case is never above the paper's FGSM
    masking = report.masking_table(runs).frame
    blind = masking[masking["zero_grad"] >= 0.5]
    assert len(blind) == 2 and set(blind["decoder"]) == {"gmm"}  # both saturated runs, not the head
    attacks = report.attack_table(runs).frame
    notes = attacks[attacks["note"].notna()]
    assert set(notes["attack"]) <= {"fgsm", "pgd", "apgd_ce"} and "fgsm" in set(notes["attack"])

    out = tmp_path / "out"
    report.write_report(suite_sweep, out)
    md = (out / "report.md").read_text()
    assert "Unreliable worst cases (1), not ranked" in md and "fgsm_only: worst-case accuracy" in md
    assert "CE-blind" in md and "worst-case accuracy" in md
    assert "Latent noise during attacks: off (deterministic model) in 4 runs" in md
    assert "apgd_dlr" in md and "Square" in md


@pytest.mark.slow  # suite_sweep trains four runs
def test_figure_one_has_a_panel_per_decoder_family(suite_sweep):
    runs = results.load_runs(suite_sweep)
    fig = report.figure_robustness(runs)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["decoder gmm"]
    assert "worst case" in fig.get_suptitle()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "CE, same decoder" in labels and "CE, own classifier" in labels and "unreliable (masked)" in labels
