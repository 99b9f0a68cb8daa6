"""The per-user data contract: a folder with `task.json` and `users.jsonl`.

`task.json` describes the task (see `perpcs.tasks.Task`); `users.jsonl` holds one user per line:
`{"user_id", "history": [{"input", "output"}] (oldest first), "queries": [{"id", "input", "output"}],
"profile"?}`. Every importer writes this and every step reads it, so errors here name the file,
the line and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from perpcs.tasks import Task
from perpcs.utils import read_json, write_json, write_jsonl


def _to_text(v: Any) -> Any:
    """Ratings often arrive as numbers: keep outputs as text, the form models generate."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return str(int(v)) if float(v).is_integer() else str(v)
    return v


class Item(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: str
    output: str

    _coerce = field_validator("output", mode="before")(_to_text)


class Query(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    input: str
    output: str

    _coerce = field_validator("id", "output", mode="before")(_to_text)


class User(BaseModel):
    model_config = ConfigDict(extra="ignore")
    user_id: str
    history: list[Item]
    queries: list[Query] = Field(default_factory=list)
    profile: str | None = None

    _coerce = field_validator("user_id", mode="before")(_to_text)


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
    parts = [f"field '{_field_path(err)}': {err['msg']}" for err in e.errors()]
    return f"{source}: " + "; ".join(parts)


def load_task(path: str | Path) -> Task:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: task file not found (a data folder needs task.json and users.jsonl)")
    try:
        return Task.model_validate(read_json(path))
    except ValidationError as e:
        raise ValueError(format_validation_error(str(path), e)) from None


def load_users(path: str | Path, task: Task | None = None) -> list[User]:
    """Parse users.jsonl, checking each line; the error names file, line and field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: users file not found")
    users, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                user = User.model_validate(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            except ValidationError as e:
                raise ValueError(format_validation_error(where, e)) from None
            if user.user_id in seen:
                raise ValueError(f"{where}: field 'user_id': duplicate user {user.user_id!r}")
            seen.add(user.user_id)
            if task is not None:
                check_user(task, user, where)
            users.append(user)
    if not users:
        raise ValueError(f"{path}: no users")
    return users


def check_user(task: Task, user: User, where: str) -> None:
    """Reject outputs a task cannot score (e.g. a label outside the label set)."""
    for field, items in (("history", user.history), ("queries", user.queries)):
        for i, it in enumerate(items):
            problem = task.output_problem(it.output)
            if problem:
                raise ValueError(f"{where}: field '{field}.{i}.output': {problem}")


def load_dataset(folder: str | Path) -> Dataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: data folder not found")
    task = load_task(folder / "task.json")
    return Dataset(task=task, users=load_users(folder / "users.jsonl", task))


def save_dataset(ds: Dataset, folder: str | Path) -> Path:
    """Write `task.json` and `users.jsonl` (each atomically)."""
    folder = Path(folder)
    write_json(folder / "task.json", ds.task.model_dump(exclude_none=True))
    write_jsonl(folder / "users.jsonl", [u.model_dump(exclude_none=True) for u in ds.users])
    return folder
