import json
import math

import pytest
from typer.testing import CliRunner

from perpcs.cli import app
from perpcs.evaluation import primary_metric, read_lamp_outputs, score, score_files, write_lamp_outputs
from perpcs.tasks import Task, get_task

ABC = Task(name="abc", kind="classification", labels=["a", "b", "c"], instruction="Pick one.")


def test_classification_hand_computed():
    golds = {"1": "a", "2": "a", "3": "b", "4": "c", "5": "b"}
    preds = {"1": " a ", "2": "b", "3": "b", "4": "c.", "5": "zzz"}  # "c." and "zzz" are not labels
    r = score(ABC, golds, preds)
    assert r["n"] == 5
    assert r["accuracy"] == pytest.approx(2 / 5)
    # a: P=1 R=1/2 F=2/3; b: P=1/2 R=1/2 F=1/2; c: never predicted, F=0
    assert r["f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_invalid_outputs_never_credited():
    # Every output invalid (and all the same string): nothing is right, no label gets credit.
    r = score(ABC, {"1": "a", "2": "b"}, {"1": "d", "2": "d"})
    assert r["accuracy"] == 0.0 and r["f1"] == 0.0


def test_macro_f1_over_fixed_label_list():
    # LaMP averages over all labels of the task, so a label absent from golds and preds counts 0.
    r = score(get_task("LaMP-1"), {"1": "[1]", "2": "[1]"}, {"1": "[1]", "2": "[1]"})
    assert r["accuracy"] == 1.0
    assert r["f1"] == pytest.approx(0.5)


def test_gold_outside_labels_is_an_error():
    with pytest.raises(ValueError, match="gold of id '1'.*not one of the task's labels"):
        score(ABC, {"1": "z"}, {"1": "a"})


def test_rating_hand_computed_with_worst_case_for_invalid():
    golds = {"a": "5", "b": "3", "c": "1", "d": "2", "e": "4", "f": "4"}
    preds = {
        "a": "4",         # |4-5| = 1
        "b": "great",     # unparsable, gold 3: 1 and 5 tie -> 5 (as LaMP), error 2
        "c": "seven",     # unparsable, gold 1: 5 is farther, error 4
        "d": "9",         # outside the scale: treated as invalid, 5 is farther, error 3
        "e": "4.5",       # error 0.5
        "f": "Score: 4",  # the number is read, error 0
    }
    r = score(get_task("LaMP-3"), golds, preds)
    errors = [1, 2, 4, 3, 0.5, 0]
    assert r["n"] == 6
    assert r["mae"] == pytest.approx(sum(errors) / 6)
    assert r["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 6))


def test_rating_custom_scale_worst_case():
    t = Task(name="stars10", kind="rating", scale=(0, 10), instruction="Rate.")
    r = score(t, {"1": "2", "2": "8"}, {"1": "", "2": "-3"})  # errors 10-2=8 and 8-0=8
    assert r["mae"] == pytest.approx(8.0) and r["rmse"] == pytest.approx(8.0)


def test_rouge_hand_computed():
    t = get_task("LaMP-4")
    golds = {"same": "The cat sat", "disjoint": "red green", "partial": "the cat sat"}
    preds = {"same": "the cat sat", "disjoint": "blue yellow", "partial": "cat the"}
    r = score(t, golds, preds)
    # partial: unigram overlap 2 -> P=2/2, R=2/3, F=0.8; LCS=1 -> P=1/2, R=1/3, F=0.4
    assert r["rouge-1"] == pytest.approx((1 + 0 + 0.8) / 3)
    assert r["rouge-L"] == pytest.approx((1 + 0 + 0.4) / 3)
    assert r["n"] == 3


def test_mismatched_ids_listed():
    with pytest.raises(ValueError) as e:
        score(ABC, {"1": "a", "2": "b", "3": "c"}, {"1": "a", "9": "b"})
    msg = str(e.value)
    assert "2 missing from predictions" in msg and "'2'" in msg and "'3'" in msg
    assert "1 extra in predictions" in msg and "'9'" in msg


def test_primary_metric():
    assert primary_metric(get_task("LaMP-2")) == ("accuracy", True)
    assert primary_metric(get_task("LaMP-3")) == ("mae", False)
    assert primary_metric(get_task("LaMP-5")) == ("rouge-1", True)


def test_lamp_file_round_trip_and_coercion(tmp_path):
    p = write_lamp_outputs(tmp_path / "out" / "preds.json", "LaMP_3", {"1": "4", "2": "x"})
    assert read_lamp_outputs(p) == ("LaMP_3", {"1": "4", "2": "x"})
    (tmp_path / "n.json").write_text(json.dumps({"golds": [{"id": 7, "output": 5}]}))
    assert read_lamp_outputs(tmp_path / "n.json") == (None, {"7": "5"})


@pytest.mark.parametrize("content, expected", [
    ({"task": "LaMP_1"}, "field 'golds'"),
    ({"golds": [{"id": "1", "output": "a"}, {"id": "2"}]}, "record 1: field 'output'"),
    ({"golds": [{"output": "a"}]}, "record 0: field 'id'"),
    ({"golds": [{"id": "1", "output": "a"}, {"id": "1", "output": "b"}]}, "record 1: field 'id': duplicate"),
    ({"golds": ["a"]}, "record 0: expected an object"),
])
def test_read_lamp_outputs_errors(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=expected) as e:
        read_lamp_outputs(path)
    assert str(path) in str(e.value)


def test_score_files_preset_and_task_json(tmp_path):
    golds = write_lamp_outputs(tmp_path / "g.json", "LaMP_1", {"1": "[1]", "2": "[2]"})
    preds = write_lamp_outputs(tmp_path / "p.json", "LaMP-1", {"1": "[1]", "2": "[1]"})
    r = score_files("LaMP_1", golds, preds)
    assert r == {"task": "LaMP-1", "accuracy": 0.5, "f1": pytest.approx((2 / 3 + 0) / 2), "n": 2}

    task_json = tmp_path / "task.json"
    task_json.write_text(json.dumps(ABC.model_dump(exclude_none=True)))
    g = write_lamp_outputs(tmp_path / "g2.json", "abc", {"1": "a"})
    p = write_lamp_outputs(tmp_path / "p2.json", "abc", {"1": "a"})
    assert score_files(str(task_json), g, p) == {"task": "abc", "accuracy": 1.0, "f1": pytest.approx(1 / 3), "n": 1}
    assert score_files(str(tmp_path), g, p)["accuracy"] == 1.0  # a data folder holding task.json


def test_score_files_task_mismatch_and_unknown_task(tmp_path):
    golds = write_lamp_outputs(tmp_path / "g.json", "LaMP_4", {"1": "x"})
    preds = write_lamp_outputs(tmp_path / "p.json", "LaMP_4", {"1": "x"})
    with pytest.raises(ValueError, match="g.json: field 'task'.*LaMP_4.*LaMP-5"):
        score_files("LaMP-5", golds, preds)
    with pytest.raises(ValueError, match="unknown task 'LaMP-9'"):
        score_files("LaMP-9", golds, preds)


def test_cli_score(tmp_path):
    golds = write_lamp_outputs(tmp_path / "g.json", "LaMP_3", {"1": "5", "2": "1"})
    preds = write_lamp_outputs(tmp_path / "p.json", "LaMP_3", {"1": "4", "2": "oops"})
    res = CliRunner().invoke(app, ["score", "--task", "LaMP-3", "--golds", str(golds), "--preds", str(preds)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"task": "LaMP-3", "mae": 2.5, "rmse": pytest.approx(math.sqrt(8.5)), "n": 2}

    bad = write_lamp_outputs(tmp_path / "bad.json", "LaMP_3", {"1": "4"})
    res = CliRunner().invoke(app, ["score", "--task", "LaMP-3", "--golds", str(golds), "--preds", str(bad)])
    assert res.exit_code == 2
    assert "1 missing from predictions" in res.output
