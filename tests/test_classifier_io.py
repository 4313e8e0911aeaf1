"""classifier.npz / classifier.json: the fitted LP and CC saved as plain arrays, checked when read (issue #27)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from wsi_ncmi.evaluation.classifier_io import (
    ClassifierError,
    SavedClassifier,
    classify,
    find_evaluation,
    record_evaluation,
)
from wsi_ncmi.evaluation.embed import EmbeddedSplit, center_and_normalize

E, C = 6, 3


def _saved(tmp_path: Path, num_classes: int = C) -> tuple[SavedClassifier, LogisticRegression, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, E))
    y = np.arange(30) % num_classes
    center = x.mean(0)
    lr = LogisticRegression(C=0.5).fit(center_and_normalize(x, center), y)
    means = rng.dirichlet(np.ones(E), size=num_classes)
    fitted = {"lp": {"coef": lr.coef_, "intercept": lr.intercept_, "classes": lr.classes_},
              "cc": {"means": means}}
    saved = SavedClassifier.from_fit(fitted, "ncmi", [f"c{i}" for i in range(num_classes)], E, center, "normalized",
                                     {"lp": 0.5, "cc": 0.1}, "abc")
    saved.write(tmp_path)
    return saved, lr, x, center


@pytest.mark.parametrize("num_classes", [2, 3])
def test_round_trip_reproduces_the_sklearn_probe(tmp_path: Path, num_classes: int) -> None:
    _, lr, x, center = _saved(tmp_path, num_classes)
    back = SavedClassifier.read(tmp_path)
    assert back.primary == "lp" and back.lp_input == "normalized" and back.temperatures == {"lp": 0.5, "cc": 0.1}
    assert back.arrays["lp_coef"].shape == (num_classes, E)  # binary probes are stored with a zero first row
    emb = EmbeddedSplit([f"s{i}" for i in range(len(x))], np.zeros(len(x), np.int64), x.astype(np.float32))
    emb.embeddings = x
    np.testing.assert_allclose(back.proba("lp", emb), lr.predict_proba(center_and_normalize(x, center)),
                               rtol=1e-10, atol=1e-12)
    proba, name, t = classify(emb, back)  # the default is the primary, with its temperature
    assert name == "lp" and t == 0.5
    logits = np.log(lr.predict_proba(center_and_normalize(x, center))) / 0.5
    ref = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(proba, ref / ref.sum(1, keepdims=True), rtol=1e-9)
    with pytest.raises(ClassifierError, match="not available"):
        classify(emb, back, "head")  # no logits on these slides


def _rewrite(tmp_path: Path, **arrays: np.ndarray) -> None:
    data = dict(np.load(tmp_path / "classifier.npz"))
    data.update(arrays)
    with open(tmp_path / "classifier.npz", "wb") as fh:
        np.savez(fh, **data)


def test_bad_arrays_are_refused_in_one_line_naming_the_file(tmp_path: Path) -> None:
    saved, *_ = _saved(tmp_path)
    npz = str(tmp_path / "classifier.npz")
    _rewrite(tmp_path, lp_coef=np.zeros((C, E + 1)))
    with pytest.raises(ClassifierError) as err:
        SavedClassifier.read(tmp_path)
    assert npz in str(err.value) and "lp_coef" in str(err.value) and "\n" not in str(err.value)

    saved.write(tmp_path)
    _rewrite(tmp_path, cc_means=np.array([{"x": 1}], dtype=object))  # needs pickle to load: refused
    with pytest.raises(ClassifierError, match="cannot read the classifier arrays") as err:
        SavedClassifier.read(tmp_path)
    assert npz in str(err.value) and "\n" not in str(err.value)

    saved.write(tmp_path)
    _rewrite(tmp_path, lp_center=np.full(E, np.nan))
    with pytest.raises(ClassifierError, match="NaN"):
        SavedClassifier.read(tmp_path)
    saved.write(tmp_path)
    _rewrite(tmp_path, something=np.zeros(2))
    with pytest.raises(ClassifierError, match="unknown arrays"):
        SavedClassifier.read(tmp_path)
    saved.write(tmp_path)
    (tmp_path / "classifier.npz").write_bytes(b"not a zip")
    with pytest.raises(ClassifierError, match="cannot read"):
        SavedClassifier.read(tmp_path)


def test_bad_settings_and_a_mismatching_checkpoint_are_refused(tmp_path: Path) -> None:
    saved, *_ = _saved(tmp_path)
    js = tmp_path / "classifier.json"
    doc = json.loads(js.read_text())
    js.write_text(json.dumps({**doc, "temperatures": {"lp": -1}}))
    with pytest.raises(ClassifierError, match="temperatures"):
        SavedClassifier.read(tmp_path)
    js.write_text(json.dumps({**doc, "primary": "os.system"}))
    with pytest.raises(ClassifierError, match="primary"):
        SavedClassifier.read(tmp_path)
    saved.write(tmp_path)
    back = SavedClassifier.read(tmp_path)
    with pytest.raises(ClassifierError, match="shape"):
        back.check(E + 2, C)  # another embedding dim
    with pytest.raises(ClassifierError, match="class names"):
        back.check(E, C, ["a", "b", "c"])


def test_evaluate_records_the_folder_in_the_run_folder(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    ev = tmp_path / "elsewhere" / "eval"
    _saved(ev)
    (ev / "calibration.json").write_text("{}")
    assert find_evaluation(ckpt, "sha").classifier_dir is None  # nothing recorded yet
    record_evaluation(ckpt, "sha", ev, ev)
    found = find_evaluation(ckpt, "sha")
    assert found.classifier_dir == ev.resolve() and found.calibration == ev.resolve() / "calibration.json"
    assert find_evaluation(ckpt, "other-sha").classifier_dir is None  # another checkpoint of the same run
    assert find_evaluation(ckpt, "x", eval_dir=ev).classifier_dir == ev  # --eval DIR
    with pytest.raises(ClassifierError, match="no such folder"):
        find_evaluation(ckpt, "x", eval_dir=tmp_path / "missing")
