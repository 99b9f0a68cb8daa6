"""Scoring exactly as LaMP's evaluation does, so our numbers compare with the papers'.

- classification: accuracy and macro-F1 over the task's fixed label list; an output that is not
  exactly a label (after strip) is wrong and is never credited to any label.
- rating: MAE and RMSE; an output that is not a number in the scale scores as the farther of the
  scale's ends from the gold (LaMP: the farther of 1 and 5).
- generation: ROUGE-1 and ROUGE-L F-measure (no stemming), mean over examples.

Golds and predictions travel in LaMP's file format: `{"task": "LaMP_2", "golds": [{"id", "output"}]}`.
"""

from __future__ import annotations

import math
from pathlib import Path

from rouge_score.rouge_scorer import RougeScorer
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, mean_squared_error

from perpcs.data import _to_text, load_task
from perpcs.errors import InputError
from perpcs.tasks import Task, _norm, get_task, parse_number
from perpcs.utils import read_json, write_json

_PRIMARY = {"classification": ("accuracy", True), "rating": ("mae", False), "generation": ("rouge-1", True)}


def primary_metric(task: Task) -> tuple[str, bool]:
    """The metric a task is ranked by, and whether higher is better."""
    return _PRIMARY[task.kind]


def _check_ids(golds: dict[str, str], preds: dict[str, str]) -> None:
    missing = [i for i in golds if i not in preds]
    extra = [i for i in preds if i not in golds]
    if missing or extra:
        raise ValueError(
            "prediction ids do not match gold ids: "
            f"{len(missing)} missing from predictions (first 10: {missing[:10]}), "
            f"{len(extra)} extra in predictions (first 10: {extra[:10]})"
        )


def _label_indices(task: Task, golds: list[str], preds: list[str], ids: list[str]) -> tuple[list[int], list[int]]:
    # As LaMP: outputs become label indices, anything else -1, which F1 never credits.
    index = {label: i for i, label in enumerate(task.labels)}
    for i, g in zip(ids, golds):
        if g.strip() not in index:
            raise ValueError(f"gold of id {i!r}: {g!r} is not one of the task's labels {list(task.labels)}")
    return [index[g.strip()] for g in golds], [index.get(p.strip(), -1) for p in preds]


def _classification(task: Task, golds: list[str], preds: list[str], ids: list[str]) -> dict:
    y_true, y_pred = _label_indices(task, golds, preds, ids)
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "f1": float(f1_score(y_true, y_pred, labels=list(range(len(task.labels))), average="macro",
                                 zero_division=0))}


def _rating_values(task: Task, golds: list[str], preds: list[str], ids: list[str]) -> tuple[list[float], list[float]]:
    lo, hi = task.scale
    y_true, y_pred = [], []
    for i, g, p in zip(ids, golds, preds):
        gold = parse_number(g)
        if gold is None or not lo <= gold <= hi:
            raise ValueError(f"gold of id {i!r}: {g!r} is not a number in the scale {[lo, hi]}")
        value = parse_number(p)
        if value is None or not lo <= value <= hi:  # invalid answer: the worst score it could get
            value = lo if abs(lo - gold) > abs(hi - gold) else hi
        y_true.append(gold)
        y_pred.append(value)
    return y_true, y_pred


def _rating(task: Task, golds: list[str], preds: list[str], ids: list[str]) -> dict:
    y_true, y_pred = _rating_values(task, golds, preds, ids)
    return {"mae": float(mean_absolute_error(y_true, y_pred)),
            "rmse": math.sqrt(mean_squared_error(y_true, y_pred))}


def _rouge(golds: list[str], preds: list[str]) -> list[dict]:
    scorer = RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    return [scorer.score(g.strip(), p.strip()) for g, p in zip(golds, preds)]


def _generation(task: Task, golds: list[str], preds: list[str], ids: list[str]) -> dict:
    scores = _rouge(golds, preds)
    return {"rouge-1": sum(s["rouge1"].fmeasure for s in scores) / len(scores),
            "rouge-L": sum(s["rougeL"].fmeasure for s in scores) / len(scores)}


_SCORERS = {"classification": _classification, "rating": _rating, "generation": _generation}


def per_query(task: Task, golds: dict[str, str], preds: dict[str, str]) -> dict[str, float]:
    """The primary metric of each predicted query alone (accuracy 0/1, absolute error, ROUGE-1 F), by
    the same rules as `score`: their mean is `score`'s primary metric on those queries."""
    extra = [i for i in preds if i not in golds]
    if extra:
        raise ValueError(f"{len(extra)} prediction ids have no gold output (first 10: {extra[:10]})")
    ids = list(preds)
    g, p = [golds[i] for i in ids], [preds[i] for i in ids]
    if task.kind == "classification":
        values = [float(t == q) for t, q in zip(*_label_indices(task, g, p, ids))]
    elif task.kind == "rating":
        values = [abs(t - q) for t, q in zip(*_rating_values(task, g, p, ids))]
    else:
        values = [s["rouge1"].fmeasure for s in _rouge(g, p)]
    return dict(zip(ids, values))


def score(task: Task, golds: dict[str, str], preds: dict[str, str]) -> dict:
    """Metrics of `preds` against `golds` (both id -> output; the ids must match exactly)."""
    _check_ids(golds, preds)
    if not golds:
        raise ValueError("nothing to score: no gold outputs")
    ids = list(golds)
    result = _SCORERS[task.kind](task, [golds[i] for i in ids], [preds[i] for i in ids], ids)
    return {**result, "n": len(ids)}


def read_lamp_outputs(path: str | Path) -> tuple[str | None, dict[str, str]]:
    """Read a LaMP golds/predictions file: (its task name or None, id -> output)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: outputs file not found")
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("golds"), list):
        raise InputError(f"{path}: field 'golds': expected an object {{\"task\", \"golds\": [{{\"id\", \"output\"}}]}}")
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        raise InputError(f"{path}: field 'task': expected a string, got {task!r}")
    outputs: dict[str, str] = {}
    for k, rec in enumerate(obj["golds"]):
        where = f"{path}: record {k}"
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected an object with 'id' and 'output', got {type(rec).__name__}")
        rid, out = _to_text(rec.get("id")), _to_text(rec.get("output"))
        for field, value in (("id", rid), ("output", out)):
            if not isinstance(value, str):
                raise InputError(f"{where}: field '{field}': expected a string, got {rec.get(field)!r}")
        if rid in outputs:
            raise InputError(f"{where}: field 'id': duplicate id {rid!r}")
        outputs[rid] = out
    return task, outputs


def write_lamp_outputs(path: str | Path, task_name: str, outputs: dict[str, str]) -> Path:
    """Write id -> output in LaMP's format (atomically), readable by LaMP's own evaluator."""
    return write_json(path, {"task": task_name, "golds": [{"id": i, "output": o} for i, o in outputs.items()]})


def resolve_task(spec: str | Path) -> Task:
    """A preset name (`LaMP-2`, `LaMP_2`), a task.json, or a data folder holding one."""
    path = Path(spec)
    if path.is_dir():
        return load_task(path / "task.json")
    if path.is_file() or path.suffix == ".json":
        return load_task(path)
    try:
        return get_task(str(spec))
    except KeyError as e:
        raise InputError(e.args[0]) from None


def score_files(task: str | Path, golds_path: str | Path, preds_path: str | Path) -> dict:
    """Score a LaMP predictions file against a LaMP golds file: `{"task", metrics..., "n"}`."""
    t = resolve_task(task)
    golds, preds = (_read_for(t, path) for path in (golds_path, preds_path))
    try:
        return {"task": t.name, **score(t, golds, preds)}
    except ValueError as e:
        raise InputError(f"{preds_path} against {golds_path}: {e}") from None


def _read_for(task: Task, path: str | Path) -> dict[str, str]:
    """Read an outputs file, refusing one written for another task (LaMP's evaluator does too)."""
    file_task, outputs = read_lamp_outputs(path)
    if file_task is not None and _norm(file_task) != _norm(task.name):
        raise InputError(f"{path}: field 'task': the file is for {file_task!r}, the scoring task is {task.name!r}")
    return outputs
