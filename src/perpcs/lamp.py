"""Convert LaMP and Per-Pcs/OPPU files into the data contract (`perpcs.data.Dataset`).

LaMP as distributed: `*_questions.json` is a list of `{"id", "input", "profile": [...]}`, where
`input` is the task's full prompt and `profile` the user's earlier items; `*_outputs.json` holds
the golds as `{"task", "golds": [{"id", "output"}]}`. Per-Pcs / OPPU process LaMP into one record
per user: `{"user_id", "profile": [...], "query": [{"id", "input", "gold"}]}`, a JSON list (or
JSON lines). Both keep LaMP's prompt in `input`; we keep only the item text the prompt wraps.
See docs/data.md for the field mapping and the choices made for LaMP-1 and LaMP-7.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from perpcs.data import Dataset, Item, Query, User, _to_text
from perpcs.errors import InputError
from perpcs.evaluation import read_lamp_outputs
from perpcs.tasks import Task, _norm, get_task
from perpcs.utils import parse_json, read_text

# The text after this marker in LaMP's prompt is the item (as LaMP's own retrieval code reads it).
_MARKERS = {"LaMP-2": "description:", "LaMP-3": "review:", "LaMP-4": "article:",
            "LaMP-5": "paper:", "LaMP-7": "after it:"}
_LAMP1 = re.compile(r'the title "(?P<title>.*)", which reference is related\?.*?'
                    r'\[1\]: "(?P<r1>.*)" \[2\]: "(?P<r2>.*)"\s*$', re.DOTALL)
# Profile item fields -> (history input, history output). LaMP-7 profiles hold only the user's
# tweets: each becomes a tweet that paraphrases to itself. LaMP-1 is built in `_citation_items`.
_FIELDS = {"LaMP-2": ("description", "tag"), "LaMP-3": ("text", "score"), "LaMP-4": ("text", "title"),
           "LaMP-5": ("abstract", "title"), "LaMP-7": ("text", "text")}


def _lamp_task(name: str) -> Task:
    try:
        task = get_task(name)
    except KeyError as e:
        raise InputError(e.args[0]) from None
    if task.name != "LaMP-1" and task.name not in _FIELDS:
        raise InputError(f"task {name!r}: LaMP import supports LaMP-1, 2, 3, 4, 5, 7")
    return task


def _field(rec: Any, field: str, where: str) -> str:
    """A text field of a record (numbers become text, e.g. a score of 4)."""
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected an object, got {type(rec).__name__}")
    value = _to_text(rec.get(field))
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{field}': expected text, got {rec.get(field)!r}")
    return value


def _filled(rec: Any, field: str, where: str) -> str:
    """A text field that may not be empty: an id, or the text of an input."""
    value = _field(rec, field, where)
    if not value.strip():
        raise InputError(f"{where}: field '{field}': empty")
    return value


def item_text(task: Task, prompt: str, where: str) -> str:
    """The item a LaMP prompt wraps: the review, the article, ...; for LaMP-1 the paper and options."""
    if task.name == "LaMP-1":
        m = _LAMP1.search(prompt)
        if not m:
            raise InputError(f"{where}: field 'input': not a LaMP-1 prompt "
                             '(... the title "...", which reference is related? ... [1]: "..." [2]: "...")')
        return _citation_input(m["title"], m["r1"], m["r2"])
    marker = _MARKERS[task.name]
    if marker not in prompt:
        raise InputError(f"{where}: field 'input': no {marker!r} in this {task.name} prompt")
    text = prompt.split(marker, 1)[1].strip()
    if not text:
        raise InputError(f"{where}: field 'input': no text after {marker!r}")
    return text


def _citation_input(title: str, ref1: str, ref2: str) -> str:
    return f"{title.strip()}\n[1]: {ref1.strip()}\n[2]: {ref2.strip()}"


def _date_key(value: Any, where: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", str(value))
    if not parts:
        raise InputError(f"{where}: field 'date': cannot read a date from {value!r}")
    return tuple(int(p) for p in parts)


def _profile(rec: dict, where: str) -> list[tuple[str, dict]]:
    """The profile items with where they came from, oldest first when the items carry a `date`."""
    profile = rec.get("profile")
    if not isinstance(profile, list):
        raise InputError(f"{where}: field 'profile': expected a list of items, got {type(profile).__name__}")
    items = [(f"{where}: profile item {j}", p) for j, p in enumerate(profile)]
    for w, p in items:
        if not isinstance(p, dict):
            raise InputError(f"{w}: expected an object, got {type(p).__name__}")
    dated = [w for w, p in items if "date" in p]
    if dated and len(dated) < len(items):
        undated = next(w for w, p in items if "date" not in p)
        raise InputError(f"{undated}: field 'date' missing while other items of this profile have one")
    if dated:
        items.sort(key=lambda wp: _date_key(wp[1]["date"], wp[0]))  # stable: ties keep file order
    return items


def _checked(task: Task, output: str, where: str, field: str) -> str:
    problem = task.output_problem(output)
    if problem:
        raise InputError(f"{where}: field '{field}': {problem}")
    return output.strip()


def _history(task: Task, uid: str, items: list[tuple[str, dict]], pool: list[tuple[str, str]]) -> list[Item]:
    if task.name == "LaMP-1":
        return _citation_items(uid, items, pool)
    inp, out = _FIELDS[task.name]
    return [Item(input=_filled(p, inp, w).strip(), output=_checked(task, _field(p, out, w), w, out))
            for w, p in items]


def _citation_items(uid: str, items: list[tuple[str, dict]], pool: list[tuple[str, str]]) -> list[Item]:
    """LaMP-1 profiles list the author's papers, without questions: build one per paper.

    Paper i asks which of two references is related: its `citation` (OPPU's processed files) or
    else another paper of the same author, against a paper of another user (from `pool`, (user
    id, title) over the whole file); the slot of the right answer is random. Seeded by the user
    id, so an import is reproducible whatever the file order.
    """
    rng = random.Random(f"lamp1:{uid}")
    titles = [_field(p, "title", w).strip() for w, p in items]
    history = []
    for i, ((w, p), title) in enumerate(zip(items, titles)):
        if "citation" in p:
            related = _field(p, "citation", w).strip()
        elif len(titles) > 1:
            j = rng.randrange(len(titles) - 1)
            related = titles[j + (j >= i)]
        else:
            continue  # a one-paper profile offers nothing to relate to
        owner, wrong = uid, ""
        while owner == uid:  # ends: the caller made sure the pool holds other users' papers
            owner, wrong = pool[rng.randrange(len(pool))]
        label = rng.choice(["[1]", "[2]"])
        refs = (related, wrong) if label == "[1]" else (wrong, related)
        history.append(Item(input=_citation_input(title, *refs), output=label))
    return history


def _read_list(path: Path, what: str) -> list[Any]:
    """A JSON list of records, or JSON lines."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} file not found")
    text = read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return _read_json_lines(path, text)
    except (RecursionError, ValueError):
        obj = parse_json(text, str(path))  # raises the InputError that names the problem
    if not isinstance(obj, list):
        raise InputError(f"{path}: expected a JSON list of records, got {type(obj).__name__}")
    return obj


def _read_json_lines(path: Path, text: str) -> list[Any]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            rows.append(parse_json(line, f"{path}: line {lineno}", lines=False))
    return rows


class _Records:
    """The records of one file, each with its user id, its place (for errors) and its sorted profile."""

    def __init__(self, task: Task, path: Path, what: str, id_field: str):
        self.rows = _read_list(path, what)
        if not self.rows:
            raise InputError(f"{path}: no records")
        self.entries, seen = [], set()
        for k, rec in enumerate(self.rows):
            where = f"{path}: record {k}"
            uid = _filled(rec, id_field, where)
            if uid in seen:
                raise InputError(f"{where}: field '{id_field}': duplicate {uid!r}")
            seen.add(uid)
            self.entries.append((uid, where, rec, _profile(rec, where)))
        self.pool = [(uid, _field(p, "title", w).strip())
                     for uid, _, _, items in self.entries for w, p in items] if task.name == "LaMP-1" else []
        if task.name == "LaMP-1" and len({owner for owner, _ in self.pool}) < 2:
            raise InputError(f"{path}: LaMP-1 history pairs each paper with a wrong reference taken from "
                             "another user's papers, and fewer than two users here have papers")


def _user(task: Task, uid: str, items: list[tuple[str, dict]], queries: list[Query],
          n_held_out: int, pool: list[tuple[str, str]], where: str) -> User:
    """One user; the `n_held_out` most recent history items become extra queries."""
    history = _history(task, uid, items, pool)
    if n_held_out:
        if task.name == "LaMP-7":
            raise InputError(f"{where}: LaMP-7 profiles hold tweets without paraphrase pairs, so no profile "
                             "item can be a query: give the golds (outputs) and n_queries=1")
        if len(history) <= n_held_out:
            raise InputError(f"{where}: field 'profile': {len(history)} usable items, too few to hold out "
                             f"{n_held_out} as queries and keep a history")
        held, history = history[-n_held_out:], history[:-n_held_out]
        queries = queries + [Query(id=f"{uid}-h{k}", input=it.input, output=it.output) for k, it in enumerate(held)]
    return User(user_id=uid, history=history, queries=queries)


def _dataset(task: Task, users: list[User], source: Path) -> Dataset:
    """Query ids name predictions when scoring, so they must be unique across users."""
    seen = set()
    for u in users:
        for q in u.queries:
            if q.id in seen:
                raise InputError(f"{source}: query id {q.id!r} (user {u.user_id!r}) is used twice")
            seen.add(q.id)
    return Dataset(task=task, users=users)


def import_lamp(questions: Path, outputs: Path | None, task: str, n_queries: int = 1) -> Dataset:
    """LaMP questions (+ golds) -> one user per question (user id = question id).

    `n_queries` is the number of queries per user. With `outputs`, the first is the question,
    answered by its gold, and the rest are the most recent profile items, held out of the history.
    Without (LaMP's test split has no public golds) the question is dropped and all `n_queries`
    are held out. `n_queries=0` keeps every user's whole profile as history and asks nothing.
    """
    t = _lamp_task(task)
    questions = Path(questions)
    if n_queries < 0:
        raise InputError(f"n_queries must be 0 or more, got {n_queries}")
    golds = None
    if outputs is not None:
        file_task, golds = read_lamp_outputs(outputs)
        if file_task is not None and _norm(file_task) != _norm(t.name):
            raise InputError(f"{outputs}: field 'task': the file is for {file_task!r}, importing {t.name!r}")
    records = _Records(t, questions, "LaMP questions", "id")
    users = []
    for qid, where, rec, items in records.entries:
        queries = []
        if golds is not None and n_queries:
            if qid not in golds:
                raise InputError(f"{outputs}: no gold for question {qid!r} ({where})")
            queries = [Query(id=qid, input=item_text(t, _field(rec, "input", where), where),
                             output=_checked(t, golds[qid], f"{outputs}: id {qid!r}", "output"))]
        users.append(_user(t, qid, items, queries, n_queries - len(queries), records.pool, where))
    if golds is not None and len(golds) != len(users):
        asked = {u.user_id for u in users}
        extra = [i for i in golds if i not in asked]
        raise InputError(f"{outputs}: {len(extra)} golds have no question in {questions} (first 10: {extra[:10]})")
    return _dataset(t, users, questions)


def import_perpcs(path: Path, task: str) -> Dataset:
    """Per-Pcs / OPPU per-user records -> users, the `query` list as queries (`gold` = output)."""
    t = _lamp_task(task)
    path = Path(path)
    records = _Records(t, path, "Per-Pcs users", "user_id")
    users = []
    for uid, where, rec, items in records.entries:
        if not isinstance(rec.get("query"), list):
            raise InputError(f"{where}: field 'query': expected a list of {{id, input, gold}}")
        queries = []
        for j, q in enumerate(rec["query"]):
            w = f"{where}: query {j}"
            text = item_text(t, _field(q, "input", w), w)
            qid = _filled(q, "id", w) if "id" in q else f"{uid}-q{j}"
            queries.append(Query(id=qid, input=text, output=_checked(t, _field(q, "gold", w), w, "gold")))
        users.append(_user(t, uid, items, queries, 0, records.pool, where))
    return _dataset(t, users, path)
