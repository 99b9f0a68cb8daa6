"""The per-user data contract: a folder with `task.json` and `users.jsonl`.

`task.json` describes the task (see `perpcs.tasks.Task`); `users.jsonl` holds one user per line:
`{"user_id", "history": [{"input", "output"}] (oldest first), "queries": [{"id", "input", "output"}],
"profile"?}`. Every importer writes this and every step reads it, so errors here name the file,
the line and the field.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from perpcs.errors import InputError
from perpcs.tasks import Task
from perpcs.utils import parse_json, read_json, sha256_file, text_lines, write_json, write_jsonl


def _to_text(v: Any) -> Any:
    """Ratings often arrive as numbers: keep outputs as text, the form models generate."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else str(v)
    return v


def text_problem(v: str) -> str | None:
    """What makes a text unusable: blank (ids key users and predictions, an empty input gives a prompt with
    nothing to answer, an empty output teaches nothing), or a lone surrogate (no UTF-8 file or JSON body holds it)."""
    if not v.strip():
        return "must not be empty"
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds a lone surrogate ({v[e.start]!a} at character {e.start + 1}), which is not text"
    return None


def check_text(v: str) -> str:
    """`v`, if `text_problem` finds nothing (a pydantic validator)."""
    problem = text_problem(v)
    if problem:
        raise ValueError(problem)
    return v


def _no_surrogate(v: str | None) -> str | None:
    return v if v is None or not v.strip() else check_text(v)


class Item(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: str
    output: str

    _coerce = field_validator("output", mode="before")(_to_text)
    _filled = field_validator("input", "output")(check_text)


class Query(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    input: str
    output: str

    _coerce = field_validator("id", "output", mode="before")(_to_text)
    _filled = field_validator("id", "input", "output")(check_text)


class User(BaseModel):
    model_config = ConfigDict(extra="ignore")
    user_id: str
    history: list[Item]
    queries: list[Query] = Field(default_factory=list)
    profile: str | None = None

    _coerce = field_validator("user_id", mode="before")(_to_text)
    _filled = field_validator("user_id")(check_text)
    _text = field_validator("profile")(_no_surrogate)


class Dataset(BaseModel):
    task: Task
    users: list[User]

    def user(self, user_id: str) -> User:
        for u in self.users:
            if u.user_id == user_id:
                return u
        raise KeyError(f"no user {user_id!r} in this data set ({len(self.users)} users)")


def _field_path(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"]) or "(record)"


def format_validation_error(source: str, e: ValidationError) -> str:
    parts = [f"field '{_field_path(err)}': {err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
    return f"{source}: " + "; ".join(parts)


def load_task(path: str | Path) -> Task:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: task file not found (a data folder needs task.json and users.jsonl)")
    try:
        return Task.model_validate(read_json(path))
    except ValidationError as e:
        raise InputError(format_validation_error(str(path), e)) from None


def read_records(path: Path, model: type[BaseModel]) -> Iterator[tuple[str, BaseModel]]:
    """(where, record) for each non-blank line of a JSONL file; an error names file, line and field."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            yield where, model.model_validate(parse_json(line, where, lines=False))
        except ValidationError as e:
            raise InputError(format_validation_error(where, e)) from None


def load_users(path: str | Path, task: Task | None = None) -> list[User]:
    """Parse users.jsonl, checking each line; the error names file, line and field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: users file not found")
    users, seen, query_ids = [], set(), {}
    for where, user in read_records(path, User):
        if user.user_id in seen:
            raise InputError(f"{where}: field 'user_id': duplicate user {user.user_id!r}")
        seen.add(user.user_id)
        for i, q in enumerate(user.queries):  # predictions are keyed by query id
            if q.id in query_ids:
                raise InputError(f"{where}: field 'queries.{i}.id': query id {q.id!r} is already used "
                                 f"({query_ids[q.id]})")
            query_ids[q.id] = f"{where.rsplit(': ', 1)[1]}, user {user.user_id!r}"
        if task is not None:
            check_user(task, user, where)
        users.append(user)
    if not users:
        raise InputError(f"{path}: no users")
    return users


def check_user(task: Task, user: User, where: str) -> None:
    """Reject a user without history (no step can use it) and outputs a task cannot score (e.g. a label
    outside the label set)."""
    if not user.history:
        raise InputError(f"{where}: field 'history': user {user.user_id!r} has no history item (every user needs one)")
    for field, items in (("history", user.history), ("queries", user.queries)):
        for i, it in enumerate(items):
            problem = task.output_problem(it.output)
            if problem:
                raise InputError(f"{where}: field '{field}.{i}.output': {problem}")


def load_history(path: str | Path, task: Task) -> list[Item]:
    """One user's history as JSONL of {"input", "output"} (oldest first), e.g. a user not in the data set."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: history file not found")
    items = []
    for where, item in read_records(path, Item):
        problem = task.output_problem(item.output)
        if problem:
            raise InputError(f"{where}: field 'output': {problem}")
        items.append(item)
    if not items:
        raise InputError(f"{path}: no history items")
    return items


def load_dataset(folder: str | Path) -> Dataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: data folder not found")
    task = load_task(folder / "task.json")
    return Dataset(task=task, users=load_users(folder / "users.jsonl", task))


def data_sha256(folder: str | Path) -> str:
    """A fingerprint of a data folder's content (task.json, then users.jsonl): runs store it to refuse
    data changed under them, since their split, sharers and recipes name its users."""
    h = hashlib.sha256()
    for name in ("task.json", "users.jsonl"):
        path = Path(folder) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (a data folder needs task.json and users.jsonl)")
        h.update(sha256_file(path).encode())
    return h.hexdigest()


def save_dataset(ds: Dataset, folder: str | Path) -> Path:
    """Write `task.json` and `users.jsonl` (each atomically), refusing a data set the contract refuses to read.
    The caller checks that `folder` may be written (`utils.check_output_dir`)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder; give a folder for the data set")
    for i, user in enumerate(ds.users):
        check_user(ds.task, user, f"{folder / 'users.jsonl'}: user {i + 1} ({user.user_id!r})")
    write_json(folder / "task.json", ds.task.model_dump(exclude_none=True))
    write_jsonl(folder / "users.jsonl", [u.model_dump(exclude_none=True) for u in ds.users])
    return folder
