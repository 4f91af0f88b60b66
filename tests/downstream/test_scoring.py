"""Grouped scoring on shared resamples, against a direct NumPy computation of the formula."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raptorz.cli.main import main
from raptorz.downstream.metrics import evaluate
from raptorz.downstream.scoring import Resamples, score_predictions
from raptorz.errors import InputError, SettingsError

N, TARGETS, B = 60, 12, 200
#: 3 groups of 4 targets; the columns are UK Biobank-like ``<field>-2.0``.
FIELDS = [str(25000 + j) for j in range(TARGETS)]
COLUMNS = [f"{f}-2.0" for f in FIELDS]
WORDS = {"amygdala": COLUMNS[0:4], "hippocampus": COLUMNS[4:8], "thalamus": COLUMNS[8:12]}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Labels, metadata and two models' predictions (with a missing truth value)."""
    folder = tmp_path_factory.mktemp("scoring")
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(N, TARGETS))
    truth[3, 5] = np.nan  # a missing target is left out of that target's r^2
    split = rng.permutation(np.array(["train"] * 20 + ["val"] * 10 + ["test"] * 30))
    ids = [f"s{i:03d}" for i in range(N)]
    labels = pd.DataFrame({"eid": ids, "split": split, **dict(zip(COLUMNS, truth.T, strict=True))})
    labels.to_csv(folder / "labels.csv", index=False)
    descriptions = [f"Volume of {word} (left)" if j % 2 else f"Volume of {word.upper()} (right)"
                    for word, members in WORDS.items() for j in range(len(members))]
    pd.DataFrame({"field_id": FIELDS, "description": descriptions, "units": "mm3"}).to_csv(
        folder / "metadata.csv", index=False)
    test = np.flatnonzero(split == "test")
    paths = {}
    for name, noise in (("good", 0.5), ("poor", 2.0)):
        prediction = truth[test] + noise * rng.normal(size=(len(test), TARGETS))
        prediction = np.nan_to_num(prediction)
        # rows in another order than the labels: matched by id
        order = rng.permutation(len(test))
        frame = pd.DataFrame(prediction[order], columns=COLUMNS)
        frame.insert(0, "eid", np.asarray(ids)[test][order])
        paths[name] = folder / f"{name}.csv"
        frame.to_csv(paths[name], index=False)
    (folder / "explicit.json").write_text(json.dumps(WORDS))
    (folder / "words.json").write_text(json.dumps({w: w for w in WORDS}))
    return {"folder": folder, "truth": truth, "test": test, "ids": ids, "paths": paths}


def reference(truth: np.ndarray, prediction: np.ndarray, indices: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """r^2 per target: on all rows, and per resample, one np.corrcoef at a time."""
    def r2(y: np.ndarray, p: np.ndarray) -> float:
        seen = ~np.isnan(y)
        return float(np.corrcoef(y[seen], p[seen])[0, 1] ** 2)

    point = np.array([r2(truth[:, j], prediction[:, j]) for j in range(truth.shape[1])])
    draws = np.array([[r2(truth[rows, j], prediction[rows, j]) for j in range(truth.shape[1])]
                      for rows in indices])
    return point, draws


def test_grouped_scores_equal_numpy(data: dict, tmp_path: Path) -> None:
    folder = data["folder"]
    kwargs = {"resamples": tmp_path / "resamples.npz", "bootstrap": B, "seed": 3}
    by_list = score_predictions(folder / "labels.csv", data["paths"],
                                groups=folder / "explicit.json", **kwargs)
    by_word = score_predictions(folder / "labels.csv", data["paths"],
                                groups=folder / "words.json", metadata=folder / "metadata.csv",
                                **kwargs)
    assert by_list.groups == by_word.groups == WORDS
    shared = Resamples.load(tmp_path / "resamples.npz")
    assert shared.indices.shape == (B, len(data["test"]))
    position = {i: k for k, i in enumerate(data["ids"])}
    truth = data["truth"][[position[i] for i in shared.ids]]
    for name, path in data["paths"].items():
        frame = pd.read_csv(path, dtype={"eid": str}).set_index("eid").loc[shared.ids]
        point, draws = reference(truth, frame[COLUMNS].to_numpy(), shared.indices)
        for result in (by_list, by_word):
            row = result.table.set_index("model").loc[name]
            for group, members in WORDS.items():
                cols = [COLUMNS.index(m) for m in members]
                means = draws[:, cols].mean(axis=1)
                low, high = np.percentile(means, [2.5, 97.5])
                np.testing.assert_allclose(row[group], point[cols].mean(), rtol=0, atol=1e-12)
                np.testing.assert_allclose([row[f"{group}_low"], row[f"{group}_high"]],
                                           [low, high], rtol=0, atol=1e-12)
    assert (by_list.table["amygdala"] > 0).all()
    good, poor = by_list.table.set_index("model")["hippocampus"][["good", "poor"]]
    assert good > poor + 0.3  # noise 0.5 vs 2.0: r^2 about 0.8 vs 0.2


def test_resamples_shared_across_calls_and_models(data: dict, tmp_path: Path) -> None:
    folder = data["folder"]
    path = tmp_path / "resamples.npz"
    first = score_predictions(folder / "labels.csv", {"good": data["paths"]["good"]},
                              resamples=path, bootstrap=B)
    # a later call, another model, another requested seed and count: the saved ones are used
    later = score_predictions(folder / "labels.csv", {"poor": data["paths"]["poor"]},
                              resamples=path, bootstrap=50, seed=99)
    np.testing.assert_array_equal(first.resamples.indices, later.resamples.indices)
    np.testing.assert_array_equal(first.resamples.ids, later.resamples.ids)
    both = score_predictions(folder / "labels.csv", data["paths"], resamples=path)
    np.testing.assert_array_equal(both.models[0].draws, first.models[0].draws)
    np.testing.assert_array_equal(both.models[1].draws, later.models[0].draws)


def test_paired_differences(data: dict, tmp_path: Path) -> None:
    folder = data["folder"]
    result = score_predictions(folder / "labels.csv", data["paths"], groups=folder /
                               "explicit.json", bootstrap=B, compare=("good", "poor"))
    good, poor = result.models
    assert result.differences is not None
    diff = result.differences.set_index("group")
    for group, members in WORDS.items():
        cols = [COLUMNS.index(m) for m in members]
        paired = good.draws[:, cols].mean(axis=1) - poor.draws[:, cols].mean(axis=1)
        np.testing.assert_allclose([diff.loc[group, "low"], diff.loc[group, "high"]],
                                   np.percentile(paired, [2.5, 97.5]), atol=1e-12)
        assert diff.loc[group, "p_not_better"] == np.mean(paired <= 0)
        assert diff.loc[group, "low"] > 0  # the better model is better on every resample


def test_cli_writes_markdown_csv_latex(data: dict, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = data["folder"]
    out = tmp_path / "scores"
    argv = ["score", f"good={data['paths']['good']}", f"poor={data['paths']['poor']}",
            "--labels", str(folder / "labels.csv"), "--groups", str(folder / "words.json"),
            "--metadata", str(folder / "metadata.csv"), "-o", str(out), "--bootstrap", "100",
            "--compare", "good", "poor"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| model | amygdala | hippocampus | thalamus |" in printed
    table = pd.read_csv(out / "scores.csv")
    assert list(table["model"]) == ["good", "poor"]
    assert table.shape == (2, 1 + 3 * 3)
    latex = (out / "scores.tex").read_text()
    assert latex.startswith(r"\begin{tabular}{lccc}") and latex.count(r"\\") == 3
    assert (out / "resamples.npz").is_file() and (out / "differences.csv").is_file()
    saved = Resamples.load(out / "resamples.npz").indices
    assert main(argv) == 0  # scored again: the saved resamples, the same table
    np.testing.assert_array_equal(Resamples.load(out / "resamples.npz").indices, saved)
    pd.testing.assert_frame_equal(pd.read_csv(out / "scores.csv"), table)


def test_clear_errors(data: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = data["folder"]
    labels, good = folder / "labels.csv", data["paths"]["good"]
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"a": [COLUMNS[0], "not_a_target"]}))
    with pytest.raises(InputError, match=r"unknown.json: group 'a' names unknown target\(s\) "
                       "not_a_target"):
        score_predictions(labels, {"m": good}, groups=unknown)
    bad_meta = tmp_path / "meta.csv"
    pd.DataFrame({"field": FIELDS, "text": FIELDS}).to_csv(bad_meta, index=False)
    with pytest.raises(InputError, match=r"meta.csv: metadata CSV lacks column\(s\) field_id, "
                       "description"):
        score_predictions(labels, {"m": good}, groups=folder / "words.json", metadata=bad_meta)
    with pytest.raises(InputError, match="needs a metadata CSV"):
        score_predictions(labels, {"m": good}, groups=folder / "words.json")
    frame = pd.read_csv(good, dtype={"eid": str})
    frame.loc[0, "eid"] = "stranger"
    frame.to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(InputError, match=r"other.csv: its ids differ from the labels' test "
                       r"split: 1 test id\(s\) missing .*1 not in the test split \(stranger\)"):
        score_predictions(labels, {"m": tmp_path / "other.csv"})
    assert main(["score", f"m={tmp_path / 'other.csv'}", "--labels", str(labels),
                 "-o", str(tmp_path / "o")]) == 2
    assert "ids differ" in capsys.readouterr().err
    assert main(["score", f"m={good}", "--labels", str(labels), "-o", str(tmp_path / "o"),
                 "--bootstrap", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    with pytest.raises(InputError, match="other test ids"):
        score_predictions(folder / "labels.csv", {"m": good}, resamples=_foreign(tmp_path))


def _foreign(tmp_path: Path) -> Path:
    return Resamples.draw(["x", "y"], 5, 0).save(tmp_path / "foreign.npz")


def test_auroc_of_a_classification_fit(tmp_path: Path) -> None:
    """A binary fit's <target>_1 column scored by AUROC, against scikit-learn per resample."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    n = 40
    truth = rng.integers(0, 2, n)
    ids = [f"v{i}" for i in range(n)]
    pd.DataFrame({"id": ids, "split": ["train"] * 10 + ["val"] * 5 + ["test"] * 25,
                  "sex": truth}).to_csv(tmp_path / "labels.csv", index=False)
    p1 = np.clip(truth[15:] * 0.3 + rng.random(25) * 0.7, 0, 1)
    pd.DataFrame({"id": ids[15:], "sex_0": 1 - p1, "sex_1": p1}).to_csv(tmp_path / "p.csv",
                                                                        index=False)
    result = score_predictions(tmp_path / "labels.csv", {"m": tmp_path / "p.csv"},
                               metric="auroc", bootstrap=100)
    assert result.table["all"].iloc[0] == pytest.approx(roc_auc_score(truth[15:], p1), abs=1e-12)
    y, p = truth[15:][result.resamples.indices], p1[result.resamples.indices]
    expected = [roc_auc_score(a, b) if 0 < a.sum() < len(a) else np.nan for a, b in zip(y, p,
                                                                                      strict=True)]
    np.testing.assert_allclose(result.models[0].draws[:, 0], expected, atol=1e-12)
    with pytest.raises(InputError, match="auroc scores binary"):
        score_predictions(_regression_labels(tmp_path), {"m": tmp_path / "p.csv"},
                          metric="auroc", bootstrap=5)


def _regression_labels(tmp_path: Path) -> Path:
    frame = pd.read_csv(tmp_path / "labels.csv")
    frame["sex"] = frame["sex"] + 0.5
    frame.to_csv(tmp_path / "reg.csv", index=False)
    return tmp_path / "reg.csv"


def test_default_group_is_what_the_first_model_predicts(data: dict, tmp_path: Path) -> None:
    frame = pd.read_csv(data["paths"]["good"], dtype={"eid": str})
    frame[["eid", *COLUMNS[:3]]].to_csv(tmp_path / "three.csv", index=False)
    result = score_predictions(data["folder"] / "labels.csv", {"m": tmp_path / "three.csv"},
                               bootstrap=10)
    assert result.groups == {"all": COLUMNS[:3]}
    frame[["eid"]].assign(other=1.0).to_csv(tmp_path / "none.csv", index=False)
    with pytest.raises(InputError, match="none.csv: predicts none of the targets"):
        score_predictions(data["folder"] / "labels.csv", {"m": tmp_path / "none.csv"})


def test_fit_and_score_agree_on_one_model(data: dict, tmp_path: Path) -> None:
    """``raptorz fit``'s scores (``evaluate``) equal ``raptorz score``'s for the same
    predictions and seed: the same r^2 (NaN for a constant prediction), resamples, interval."""
    test, names = data["test"], COLUMNS[:3]
    truth = data["truth"][test][:, :3]
    prediction = truth + np.random.default_rng(9).normal(size=truth.shape)
    prediction[:, 2] = 0.1  # constant: r^2 undefined
    frame = pd.DataFrame(prediction, columns=names)
    frame.insert(0, "eid", np.asarray(data["ids"])[test])
    frame.to_csv(tmp_path / "p.csv", index=False)
    scored = score_predictions(data["folder"] / "labels.csv", {"m": tmp_path / "p.csv"},
                               groups={name: [name] for name in names}, bootstrap=B, seed=7)
    row = scored.table.iloc[0]
    fitted = evaluate("regression", names, truth, prediction, resamples=B, seed=7)
    for name in names[:2]:
        reported = fitted["targets"][name]["pearson_r2"]
        np.testing.assert_allclose([row[name], row[f"{name}_low"], row[f"{name}_high"]],
                                   [reported["value"], reported["low"], reported["high"]],
                                   rtol=0, atol=1e-12)
    assert fitted["targets"][names[2]]["pearson_r2"] == {"value": None, "low": None,
                                                        "high": None}
    assert np.isnan(row[[names[2], f"{names[2]}_low", f"{names[2]}_high"]].to_numpy(float)).all()


def original_report(truth: np.ndarray, prediction: np.ndarray, columns: list[int],
                    boot_ixs: np.ndarray) -> tuple[float, float]:
    """The original's ``scripts/ucla/score_ukbb20252.py`` for one group, line for line."""
    sls = []
    for ci in columns:
        reps = []
        for bixs in boot_ixs:
            reps += [np.corrcoef(truth[:, ci][bixs], prediction[:, ci][bixs])[0, 1] ** 2]
        sls += [reps]
    smat = np.array(sls)
    avgstat = np.mean(smat, 0)
    return float(np.mean(avgstat)), float(1.95 * np.std(avgstat))


def test_original_interval_equals_the_original_formula(data: dict, tmp_path: Path) -> None:
    folder = data["folder"]
    groups = {g: WORDS[g] for g in ("amygdala", "thalamus")}  # no missing truth value
    path = tmp_path / "resamples.npz"
    result = score_predictions(folder / "labels.csv", data["paths"], groups=groups,
                               resamples=path, bootstrap=10, seed=1, compare=("good", "poor"),
                               interval="original")
    assert result.interval == "original"
    shared = result.resamples
    position = {i: k for k, i in enumerate(data["ids"])}
    truth = data["truth"][[position[i] for i in shared.ids]]
    table = result.table.set_index("model")
    assert result.differences is not None
    differences = result.differences.set_index("group")
    for group, members in groups.items():
        columns = [COLUMNS.index(m) for m in members]
        reports = {}
        for name, csv in data["paths"].items():
            frame = pd.read_csv(csv, dtype={"eid": str}).set_index("eid").loc[shared.ids]
            prediction = frame[COLUMNS].to_numpy()
            est, ci95 = original_report(truth, prediction, columns, shared.indices)
            np.testing.assert_allclose(
                table.loc[name, [group, f"{group}_low", f"{group}_high"]].to_numpy(float),
                [est, est - ci95, est + ci95], rtol=0, atol=1e-12)
            reports[name] = np.mean([[np.corrcoef(truth[rows, c], prediction[rows, c])[0, 1] ** 2
                                      for c in columns] for rows in shared.indices], axis=1)
        paired = reports["good"] - reports["poor"]
        np.testing.assert_allclose(differences.loc[group, ["difference", "low", "high"]]
                                   .to_numpy(float),
                                   [paired.mean(), paired.mean() - 1.95 * paired.std(),
                                    paired.mean() + 1.95 * paired.std()], rtol=0, atol=1e-12)
    # the default on the same resamples: the value on the whole split, percentile interval
    default = score_predictions(folder / "labels.csv", data["paths"], groups=groups,
                                resamples=path).table.set_index("model")
    assert not np.allclose(default["amygdala"], table["amygdala"])
    out = tmp_path / "cli"
    assert main(["score", *(f"{n}={p}" for n, p in data["paths"].items()), "--labels",
                 str(folder / "labels.csv"), "--groups", str(folder / "explicit.json"),
                 "--resamples", str(path), "-o", str(out), "--interval", "original"]) == 0
    written = pd.read_csv(out / "scores.csv").set_index("model")
    np.testing.assert_allclose(written[table.columns].to_numpy(float), table.to_numpy(float),
                               rtol=0, atol=1e-12)
    with pytest.raises(SettingsError, match="interval must be one of percentile, original"):
        score_predictions(folder / "labels.csv", data["paths"],
                          interval="normal")  # type: ignore[arg-type]


def test_score_help_renders_percent_signs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["score", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "with a 95% bootstrap interval" in text
    assert "%%" not in text
    assert "--interval {percentile,original}" in text
