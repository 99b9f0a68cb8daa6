"""Issue 12, kept fixed: bad input ends in a clean error that names the file (and line and field),
never a traceback, and touches nothing outside the output.

`CASES` is the table: each builds its input in a fresh folder and gives the CLI arguments and the
pieces of text the message must hold. Cases that need a run work on a copy of one tiny finished run.
After the table come the cases whose fix is a behaviour (resume, locking, budgets, ...), not a message.
"""

import gzip
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
from typer.testing import CliRunner

from small_sources import OPTS, SOURCES, TASK, USERS, data_folder, write_sources

from perpcs.cli import app
from perpcs.errors import InputError
from perpcs.pipeline import Run
from perpcs.recipe import Recipe
from perpcs.utils import atomic_dir, atomic_path, remove_temp, write_json

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_run_config):
    folder = tmp_path_factory.mktemp("run") / "run"
    Run.create(folder, tiny_run_config()).pipeline()
    return folder


def run_copy(finished_run: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp / "run", symlinks=True))


def cli(*args, cwd: Path | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def squash(text: str) -> str:
    """Rich wraps long lines (and folds long paths): compare with all whitespace removed."""
    return "".join(text.split())


def snapshot(root: Path) -> dict[str, str | None]:
    """Every path under `root` with its content's hash (None for a folder); the run lock excluded."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*")) if p.name != "run.lock"}


def users_bytes(users: list[dict]) -> bytes:
    return "".join(json.dumps(u) + "\n" for u in users).encode()


def with_output(output: str, where: str = "history") -> list[dict]:
    users = json.loads(json.dumps(USERS))
    users[0][where][0]["output"] = output
    return users


def edited(users: list[dict], edit: Callable[[list[dict]], None]) -> list[dict]:
    users = json.loads(json.dumps(users))
    edit(users)
    return users


def corrupt_sharers(pool: Path) -> None:
    """Garbage instead of each sharer file, with the manifest's hash updated to match it."""
    db = sqlite3.connect(pool / "pool.sqlite")
    with db:
        for idx, file in db.execute("SELECT idx, file FROM sharers").fetchall():
            data = b"\xff\xff\x00\x00\x00\x00\x00\x00{not a header"
            (pool / file).write_bytes(data)
            db.execute("UPDATE sharers SET sha256 = ?, nbytes = ? WHERE idx = ?",
                       (hashlib.sha256(data).hexdigest(), len(data), idx))
    db.close()


def point_sharer_at(pool: Path, file: str) -> None:
    db = sqlite3.connect(pool / "pool.sqlite")
    with db:
        db.execute("UPDATE sharers SET file = ? WHERE idx = (SELECT MIN(idx) FROM sharers)", (file,))
    db.close()


def edit_recipe(run: Path, edit: Callable[[dict], None]) -> tuple[str, Path]:
    """Edit the first target's recipe file; returns (user, recipe path)."""
    user = json.loads((run / "split.json").read_text())["targets"][0]
    path = Run(run).recipe_path(user)
    recipe = json.loads(path.read_text())
    edit(recipe)
    path.write_text(json.dumps(recipe))
    return user, path


def nan_weight(recipe: dict) -> None:
    pos = next(p for p, chosen in recipe["pieces"].items() if chosen)
    recipe["pieces"][pos][0][1] = float("nan")


class Case(NamedTuple):
    """`build(tmp, run)` makes the input under `tmp` (`run`: a path to copy a finished run from, or None)
    and returns (CLI arguments, texts the message must hold, the output path that may change or None)."""
    id: str
    build: Callable
    needs_run: bool = False


def _export(run: Path, out) -> list:
    user = json.loads((run / "split.json").read_text())["targets"][0]
    return ["export", "--run", run, "--user", user, "--out", out]


def _import(fmt: str, paths: list[Path], tmp: Path) -> list:
    return ["data", "import", fmt, *paths, "--out", tmp / "out", "--min-history", "1", "--task", "LaMP-3"]


def _truncated_gz(fmt: str) -> Callable:
    def build(tmp, _):
        paths = write_sources(fmt, tmp / "src", gz=set(SOURCES[fmt]))
        paths[-1].write_bytes(paths[-1].read_bytes()[:-12])
        return _import(fmt, paths, tmp), [str(paths[-1]), "truncated gzip file"], tmp / "out"
    return build


def _not_utf8(fmt: str) -> Callable:
    def build(tmp, _):
        name = sorted(SOURCES[fmt])[-1]
        paths = write_sources(fmt, tmp / "src", {**SOURCES[fmt], name: SOURCES[fmt][name].replace(b"e", b"\xe9", 1)})
        bad = next(p for p in paths if p.name == name)
        return _import(fmt, paths, tmp), [str(bad), "line 1: not utf-8 text (byte 0xe9"], tmp / "out"
    return build


def _data_check(users: bytes | list = USERS, task: bytes | dict = TASK, *expect: str) -> Callable:
    def build(tmp, _):
        folder = data_folder(tmp / "d", task, users)
        return ["data", "check", folder], [str(folder), *expect], None
    return build


def _score(preds: bytes, *expect: str) -> Callable:
    def build(tmp, _):
        golds = write_json(tmp / "golds.json", {"task": "LaMP_3", "golds": [{"id": "1", "output": "3"}]})
        (tmp / "preds.json").write_bytes(preds)
        return ["score", "--task", "LaMP-3", "--golds", golds, "--preds", tmp / "preds.json"], \
            [str(tmp / "preds.json"), *expect], None
    return build


def _prepare(make: Callable[[Path], Path], *expect: str) -> Callable:
    def build(tmp, _):
        base = make(tmp)
        return ["model", "prepare", "--base", base], [str(base), *expect], None
    return build


def _fake_gguf(tmp: Path) -> Path:
    (tmp / "m.gguf").write_text("not a model\n")
    return tmp / "m.gguf"


def _model_folder(config: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / "m").mkdir()
        (tmp / "m" / "config.json").write_text(config)
        return tmp / "m"
    return make


def _export_case(out: Callable[[Path, Path], Path], *expect: str, prepare: Callable[[Path], None] = lambda run: None,
                 ) -> Callable:
    def build(tmp, finished):
        run = run_copy(finished, tmp)
        prepare(run)
        target = out(tmp, run)
        return _export(run, target), list(expect), None
    return build


def _notes(tmp: Path, run: Path) -> Path:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("keep me")
    return tmp / "mine"


def _bad_recipe(edit: Callable[[dict], None], *expect: str) -> Callable:
    def build(tmp, finished):
        run = run_copy(finished, tmp)
        _, path = edit_recipe(run, edit)
        return _export(run, tmp / "out"), [str(path), *expect], tmp / "out"
    return build


def _task_json_folder(tmp, _):
    folder = data_folder(tmp / "d")
    (folder / "task.json").unlink()
    (folder / "task.json").mkdir()
    return ["data", "check", folder], [str(folder / "task.json"), "is a folder, expected a file"], None


def _preds_folder(tmp, _):
    (tmp / "preds").mkdir()
    golds = write_json(tmp / "g.json", {"golds": []})
    return (["score", "--task", "LaMP-3", "--golds", golds, "--preds", tmp / "preds"],
            [str(tmp / "preds"), "is a folder, expected a file"], None)


def _source_folder(tmp, _):
    (tmp / "reviews").mkdir()
    return _import("amazon-reviews", [tmp / "reviews"], tmp), [str(tmp / "reviews"), "is a folder, expected a file"], \
        tmp / "out"


def _out_file(tmp, _):
    (tmp / "taken").write_text("mine")
    paths = write_sources("amazon-reviews", tmp / "s")
    return (["data", "import", "amazon-reviews", *paths, "--out", tmp / "taken", "--min-history", "1"],
            [str(tmp / "taken"), "exists and is not a folder"], None)


def _deep_import(tmp, _):
    paths = write_sources("amazon-reviews", tmp / "s", {"r.json": DEEP})
    return _import("amazon-reviews", paths, tmp), [str(paths[0]), "line 1: invalid JSON: nested too deeply"], tmp / "out"


def _outside(run: Path) -> None:
    shutil.copy(next((run / "pool" / "sharers").iterdir()), run / "outside.safetensors")
    point_sharer_at(run / "pool", "../../outside.safetensors")


def _changed_data(tmp, finished):
    data = Path(shutil.copytree(json.loads((finished / "run.json").read_text())["data"], tmp / "data"))
    run = run_copy(finished, tmp)
    cfg = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**cfg, "data": str(data)}))
    with open(data / "users.jsonl", "a") as f:
        f.write("\n")  # any change of the bytes counts
    return ["pipeline", "--data", data, "--run", run], [str(data), "the data folder changed since run", "data_sha256"], None


CASES = [
    # 1. export never destroys a folder it did not write
    Case("export-into-folder-with-notes", _export_case(_notes, "notes.txt", "--force"), True),
    Case("export-into-current-folder", _export_case(lambda tmp, run: Path("."), "current folder"), True),
    Case("export-into-run-pool", _export_case(lambda tmp, run: run / "pool", "pool", "is, holds or is inside"), True),
    Case("export-into-run-folder", _export_case(lambda tmp, run: run, "is, holds or is inside"), True),
    Case("export-over-run-parent", _export_case(lambda tmp, run: tmp, "refusing to write over it"), True),
    # 2. messages are never read as rich markup
    Case("markup-closing-tag", _data_check(users_bytes(with_output("[/x]")), TASK, "line 1", "'history.0.output'",
                                           "'[/x]' is not one of the task's labels ['sci-fi', 'comedy']")),
    Case("markup-style", _data_check(users_bytes(with_output("[bold red]scifi")), TASK, "'[bold red]scifi'")),
    Case("markup-brackets", _data_check(USERS, {**TASK, "kind": "rating", "scale": [5, 1]},
                                        "'scale' must be [min, max] with min < max, got [5.0, 1.0]")),
    Case("markup-link", _data_check(users_bytes(with_output("[link=https://example.com]x[/link]")), TASK,
                                    "'[link=https://example.com]x[/link]'")),
    # 3. the data contract: query ids unique across and within users, ids and inputs not empty
    Case("duplicate-query-id-across-users",
         _data_check(users_bytes(edited(USERS, lambda u: u[1]["queries"][0].update(id="q0"))), TASK,
                     "line 2", "field 'queries.0.id'", "query id 'q0' is already used (line 1, user 'u0')")),
    Case("duplicate-query-id-within-user",
         _data_check(users_bytes(edited(USERS, lambda u: u[0]["queries"].append(dict(u[0]["queries"][0])))), TASK,
                     "line 1", "field 'queries.1.id'", "query id 'q0' is already used (line 1, user 'u0')")),
    Case("empty-user-id", _data_check(users_bytes(edited(USERS, lambda u: u[0].update(user_id=""))), TASK,
                                      "line 1", "field 'user_id'", "must not be empty")),
    Case("empty-history-input", _data_check(users_bytes(edited(USERS, lambda u: u[1]["history"][1].update(input=" "))),
                                            TASK, "line 2", "field 'history.1.input'", "must not be empty")),
    Case("empty-query-input", _data_check(users_bytes(edited(USERS, lambda u: u[0]["queries"][0].update(input=""))),
                                          TASK, "line 1", "field 'queries.0.input'", "must not be empty")),
    # 6. recipes: finite weights, a known mix
    Case("recipe-nan-weight", _bad_recipe(nan_weight, "sharer", "weight nan is not a finite number"), True),
    Case("recipe-mix-concat", _bad_recipe(lambda r: r.update(mix="concat"), "mix", "'linear' or 'cat'"), True),
    # 7. a truncated .gz names the file
    *[Case(f"truncated-gz-{fmt}", _truncated_gz(fmt)) for fmt in ("amazon-reviews", "annotator-csv", "lastfm-tags",
                                                                  "papers-jsonl", "lamp", "perpcs")],
    # 8. bytes that are not UTF-8 (lastfm-tags reads Latin-1 instead, by design)
    *[Case(f"not-utf8-{fmt}", _not_utf8(fmt)) for fmt in ("amazon-reviews", "annotator-csv", "papers-jsonl",
                                                          "lamp", "perpcs")],
    Case("not-utf8-users", _data_check(users_bytes(USERS).replace(b"movie", b"mov\xffe", 1), TASK,
                                       "users.jsonl: line 1: not utf-8 text (byte 0xff")),
    Case("not-utf8-task", _data_check(USERS, json.dumps(TASK).encode().replace(b"Tag", b"T\xe9g"),
                                      "task.json: line 1: not utf-8 text (byte 0xe9")),
    Case("not-utf8-preds", _score(b'{"task": "LaMP_3", "golds": [{"id": "1", "output": "\xff"}]}',
                                  "line 1: not utf-8 text (byte 0xff")),
    # 9. no tracebacks
    Case("prepare-text-file-as-gguf", _prepare(_fake_gguf, "not a GGUF model")),
    Case("prepare-bad-config", _prepare(_model_folder("{oops"), "not a model folder transformers can load")),
    Case("prepare-config-only", _prepare(_model_folder('{"model_type": "llama"}'),
                                         "not a model folder transformers can load")),
    Case("task-json-is-a-folder", _task_json_folder),
    Case("preds-is-a-folder", _preds_folder),
    Case("import-source-is-a-folder", _source_folder),
    Case("import-out-is-a-file", _out_file),
    Case("deep-json-users", _data_check(DEEP + b"\n", TASK, "users.jsonl: line 1: invalid JSON: nested too deeply")),
    Case("deep-json-task", _data_check(USERS, DEEP, "task.json: invalid JSON: nested too deeply")),
    Case("deep-json-preds", _score(DEEP, "invalid JSON: nested too deeply")),
    Case("deep-json-import", _deep_import),
    Case("corrupt-safetensors-matching-hash", _export_case(
        lambda tmp, run: tmp / "out", "sharers", "not a readable safetensors file",
        prepare=lambda run: corrupt_sharers(run / "pool")), True),
    Case("data-changed-under-run", _changed_data, True),
    # 11. a pool's manifest may only name files inside the pool
    Case("pool-path-outside", _export_case(lambda tmp, run: tmp / "out", "'../../outside.safetensors'",
                                           "is outside the pool folder", prepare=_outside), True),
    Case("pool-path-absolute", _export_case(
        lambda tmp, run: tmp / "out", "is outside the pool folder",
        prepare=lambda run: point_sharer_at(run / "pool", str(next((run / "pool" / "sharers").iterdir()).resolve()))),
         True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly(case, tmp_path, request, monkeypatch):
    finished = request.getfixturevalue("finished_run") if case.needs_run else None
    monkeypatch.setenv("PERPCS_HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # `--out .` must find the current folder refused
    args, expect, out = case.build(tmp_path, finished)
    before = snapshot(tmp_path)
    result = cli(*args)
    output = result.output
    assert result.exit_code != 0, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output and "Aborted" not in output, output
    assert "error:" in output
    for text in expect:
        assert squash(text) in squash(output), f"{text!r} not in {output!r}"
    after = snapshot(tmp_path)
    if out is not None:
        after = {k: v for k, v in after.items() if not (tmp_path / k).is_relative_to(out)}
        before = {k: v for k, v in before.items() if not (tmp_path / k).is_relative_to(out)}
    assert after == before  # nothing outside the output was touched
