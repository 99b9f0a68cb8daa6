"""Issue 12, kept fixed: bad input ends in a clean error that names the file (and line and field),
never a traceback, and touches nothing outside the output.

`CASES` is the table: each builds its input in a fresh folder and gives the CLI arguments and the
pieces of text the message must hold. Cases that need a run work on a copy of one tiny finished run.
After the table come the cases whose fix is a behaviour (resume, locking, budgets, ...), not a message.
"""

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from perpcs.errors import InputError
from perpcs.pipeline import Run
from perpcs.recipe import Recipe
from perpcs.runfolder import safe_name
from perpcs.utils import atomic_dir, atomic_path, remove_temp, write_json
from small_sources import SOURCES, TASK, USERS, data_folder, write_sources

DEEP = b"[" * 100_000 + b"]" * 100_000


def run_copy(finished_run: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp / "run", symlinks=True))


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
    """Edit the first target's recipe, written back as a JSON recipe (the layout a person can edit,
    which `Run.recipe_path` prefers); returns (user, recipe path)."""
    user = json.loads((run / "split.json").read_text())["targets"][0]
    binary = Run(run).recipe_path(user)
    recipe = Recipe.load(binary).model_dump(mode="json")
    edit(recipe)
    path = binary.with_suffix(".json")
    path.write_text(json.dumps(recipe))
    binary.unlink()
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
    expect = [str(paths[0]), "line 1: invalid JSON: nested too deeply"]
    return _import("amazon-reviews", paths, tmp), expect, tmp / "out"


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
    expect = [str(data), "the data folder changed since run", "data_sha256"]
    return ["pipeline", "--data", data, "--run", run], expect, None


def tamper_sharers(pool: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Edit the tensors of every sharer file, with the manifest's hash updated to match (so the integrity
    check passes and only the tensor checks can refuse them)."""
    from safetensors import safe_open
    from safetensors.torch import save

    db = sqlite3.connect(pool / "pool.sqlite")
    with db:
        for idx, file in db.execute("SELECT idx, file FROM sharers").fetchall():
            with safe_open(pool / file, "pt") as f:
                tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
            edit(tensors)
            data = save(tensors, metadata=meta)
            (pool / file).write_bytes(data)
            db.execute("UPDATE sharers SET sha256 = ?, nbytes = ? WHERE idx = ?",
                       (hashlib.sha256(data).hexdigest(), len(data), idx))
    db.close()


def each(name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    """An edit of every tensor whose name ends in `name` (lora_A, lora_B, activation)."""
    def edit(tensors: dict) -> None:
        for k in [k for k in tensors if k.endswith("." + name)]:
            tensors[k] = change(tensors[k]).contiguous()
    return edit


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() // 2] = float("nan")
    return t


def _tampered(edit: Callable[[dict], None], *expect: str) -> Callable:
    return _export_case(lambda tmp, run: tmp / "out", "sharers", *expect,
                        prepare=lambda run: tamper_sharers(run / "pool", edit))


def _manifest(sql: str, *expect: str) -> Callable:
    def prepare(run: Path) -> None:
        db = sqlite3.connect(run / "pool" / "pool.sqlite")
        with db:
            db.execute(sql)
        db.close()
    return _export_case(lambda tmp, run: tmp / "out", "pool.sqlite", *expect, prepare=prepare)


def _pipeline(*args: str, expect: tuple[str, ...]) -> Callable:
    """`perpcs pipeline` with these settings: refused before any step (the run folder is never made)."""
    def build(tmp, _):
        folder = data_folder(tmp / "d")
        return ["pipeline", "--data", folder, "--run", tmp / "run", *args], list(expect), None
    return build


def _set(pair: str, *expect: str) -> Case:
    return Case(f"set-{pair}", _pipeline("--set", pair, expect=(f"--set {pair}:", *expect)))


def _config_list(tmp, _):
    (tmp / "c.json").write_text("[1, 2]")
    return (["init", "--data", data_folder(tmp / "d"), "--run", tmp / "run", "--config", tmp / "c.json"],
            [str(tmp / "c.json"), "expected a JSON object of RunConfig fields, got a list"], None)


def _over_data(tmp, _):
    folder = data_folder(tmp / "mine")
    return ["data", "synth", "--kind", "rating", "--out", folder], [str(folder), "holds files", "--force"], None


def _over_own_source(tmp, _):
    paths = write_sources("perpcs", tmp / "imp")
    return (["data", "import", "perpcs", *paths, "--task", "LaMP-3", "--out", tmp / "imp", "--force"],
            [str(tmp / "imp"), "is, holds or is inside", str(paths[0])], None)


def _over_run_data(tmp, finished):
    data = Path(json.loads((finished / "run.json").read_text())["data"])
    paths = write_sources("amazon-reviews", tmp / "s")
    return (["data", "import", "amazon-reviews", *paths, "--out", data, "--min-history", "1"],
            [str(data), "already holds files this command does not replace", "--force"], None)


def _target_history(tmp, finished):
    run = run_copy(finished, tmp)
    user = json.loads((run / "split.json").read_text())["targets"][0]
    (tmp / "junk.jsonl").write_text(json.dumps({"input": "junk", "output": "comedy"}) + "\n")
    return (["assemble", "--run", run, "--user", user, "--history", tmp / "junk.jsonl"],
            [f"user {user!r} is in the run's data set", "give the new history a user id of its own"], None)


def _empty_user(tmp, finished):
    run = run_copy(finished, tmp)
    (tmp / "h.jsonl").write_text(json.dumps({"input": "a film", "output": "comedy"}) + "\n")
    return (["assemble", "--run", run, "--user", "", "--history", tmp / "h.jsonl"],
            ["user id ''", "must not be empty"], None)


def _base_into_run(tmp, finished):
    run = run_copy(finished, tmp)
    return (["export-base", "--run", run, "--out", run / "task" / "merged" / "sub"],
            [str(run / "task" / "merged" / "sub"), "is, holds or is inside"], None)


def _unknown_in_split(tmp, finished):
    run = run_copy(finished, tmp)
    split = json.loads((run / "split.json").read_text())
    write_json(run / "split.json", {**split, "targets": ["nobody", *split["targets"][1:]]})
    return ["assemble", "--run", run], [str(run / "split.json"), "field 'targets.0'", "no user 'nobody'"], None


def _diverged(tmp, finished):
    """A sharer whose pieces hold NaN (its training diverged) is refused by name as step 4 adds it."""
    from perpcs.pipeline import load_pieces, save_pieces

    run = run_copy(finished, tmp)
    shutil.rmtree(run / "pool")
    folder = next(p for p in sorted((run / "sharers").iterdir()) if (p / "pieces.safetensors").exists())
    pieces = load_pieces(folder / "pieces.safetensors")
    pos = next(iter(pieces))
    A, B, key = pieces[pos]
    save_pieces(folder / "pieces.safetensors", {**pieces, pos: (A, with_nan(B), key)})
    user = next(s.user_id for s in Run(run).selection() if safe_name(s.user_id) == folder.name)
    return ["share", "--run", run], [f"sharer {user!r}", f"position {pos}", "lora_B holds NaN or infinite values",
                                     "lower sharer_train.lr"], run / "pool"


def _rating_output(output: str) -> Callable:
    return _data_check(users_bytes(with_output(output)), {**TASK, "kind": "rating", "scale": [1, 5], "labels": None},
                       "field 'history.0.output'", f"{output!r} is not a number in the scale [1.0, 5.0]")


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
    Case("markup-in-path", lambda tmp, _: (["data", "check", tmp / "d[/x]"], [f"{tmp}/d[/x]: data folder not found"],
                                           None)),
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
    # 12. nothing writes over data it did not create (utils.check_output_dir)
    Case("synth-over-a-data-folder", _over_data),
    Case("import-over-its-own-source", _over_own_source),
    Case("import-over-a-runs-data", _over_run_data, True),
    Case("export-base-into-the-run", _base_into_run, True),
    # 13. every number is checked by its schema before any step, named as the user wrote it
    _set("assembly.strength=NaN", "a strength is a number from 0 to 10"),
    _set("assembly.strength=1e30", "a strength is a number from 0 to 10"),
    _set("assembly.temperature=-1", "greater than 0"),
    _set("assembly.recent_k=0", "greater than or equal to 1"),
    _set("task_train.steps=-5", "greater than or equal to 1"),
    _set("sharer_train.batch_size=0", "greater than or equal to 1"),
    _set("device=tpu", "should match pattern"),
    _set("assembly.top_k=0", "greater than or equal to 1"),
    _set("assembly.batch_size=0", "greater than or equal to 1"),
    _set("seed=-1", "greater than or equal to 0"),
    _set("max_len=1", "greater than or equal to 16"),
    _set("sharer_train.lr=-0.001", "greater than 0"),
    _set("sharer_train.lr=1e9", "less than or equal to 10"),
    _set("gate_train.lr=inf", "finite number"),
    _set("n_sharers=true", "expected a number, got true"),
    _set("assembly.topk=3", "not a setting"),
    Case("flag-seed-negative", _pipeline("--seed", "-1", expect=("--seed -1:", "greater than or equal to 0"))),
    Case("config-is-a-list", _config_list),
    # 14. pieces are checked when read, whatever their hash says
    Case("pieces-nan-lora-a", _tampered(each("lora_A", with_nan), "lora_A holds NaN or infinite values"), True),
    Case("pieces-nan-lora-b", _tampered(each("lora_B", with_nan), "lora_B holds NaN or infinite values"), True),
    Case("pieces-int8", _tampered(each("lora_A", lambda t: t.to(torch.int8)), "lora_A is int8"), True),
    Case("pieces-rank-4-in-r-8-pool", _tampered(each("lora_A", lambda t: t[:4]), "lora_A has shape [4,",
                                                "(LoRA r=8)"), True),
    Case("pieces-wrong-width", _tampered(each("lora_A", lambda t: t[:, :-1]), "lora_A has shape"), True),
    Case("pieces-tensor-missing", _tampered(lambda ts: [ts.pop(k) for k in list(ts) if k.endswith(".lora_B")],
                                            "is missing or unreadable"), True),
    Case("diverged-sharer-refused-by-name", _diverged, True),
    # 15. recipes are checked against their pool
    Case("recipe-keeps-2-of-8-positions", _bad_recipe(lambda r: r.update(pieces=dict(list(r["pieces"].items())[:2])),
                                                      "field 'pieces'", "missing"), True),
    Case("recipe-weights-x1000", _bad_recipe(lambda r: [c.__setitem__(i, [s, w * 1000]) for c in r["pieces"].values()
                                                        for i, (s, w) in enumerate(c)], "is not in [0, 1]"), True),
    Case("recipe-negative-weights", _bad_recipe(lambda r: [c.__setitem__(i, [s, -w]) for c in r["pieces"].values()
                                                           for i, (s, w) in enumerate(c)], "is not in [0, 1]"), True),
    Case("recipe-sharers-twice", _bad_recipe(lambda r: r.update(pieces={p: [[s, w / 2] for s, w in c] * 2
                                                                        for p, c in r["pieces"].items()}),
                                             "are listed twice"), True),
    Case("recipe-gate-proj", _bad_recipe(lambda r: r["lora"].update(target_modules=["gate_proj"]), "field 'lora'",
                                         "target_modules"), True),
    Case("recipe-strength-nan", _bad_recipe(lambda r: r.update(strength=float("nan")), "strength"), True),
    Case("recipe-strength-1e30", _bad_recipe(lambda r: r.update(strength=1e30), "strength"), True),
    Case("recipe-lora-r-4", _bad_recipe(lambda r: r["lora"].update(r=4), "field 'lora'", "r (recipe 4, pool 8)"), True),
    Case("recipe-no-alpha", _bad_recipe(lambda r: r["lora"].pop("alpha"), "missing alpha"), True),
    Case("recipe-unknown-sharer", _bad_recipe(lambda r: next(c for c in r["pieces"].values() if c)[0].__setitem__(
        0, "s000000000000"), "sharer s000000000000 does not share this position"), True),
    # 16. a target's recipe is never replaced by another history
    Case("assemble-history-for-a-target", _target_history, True),
    Case("assemble-empty-user-id", _empty_user, True),
    # 17. the data contract
    Case("labels-twice", _data_check(USERS, {**TASK, "labels": ["sci-fi", "comedy", "comedy"]}, "task.json",
                                     "labels ['comedy'] are listed twice")),
    Case("label-with-newline", _data_check(USERS, {**TASK, "labels": ["sci-fi", "com\nedy"]}, "task.json",
                                           "a label is one line of text")),
    Case("label-leading-space", _data_check(USERS, {**TASK, "labels": ["sci-fi", " comedy"]}, "task.json",
                                            "label ' comedy'", "without leading or trailing spaces")),
    Case("max-new-tokens-1e9", _data_check(USERS, {**TASK, "max_new_tokens": 10**9}, "task.json",
                                           "field 'max_new_tokens'", "less than or equal to 4096")),
    Case("user-without-history", _data_check(users_bytes(edited(USERS, lambda u: u[1].update(history=[]))), TASK,
                                             "line 2", "field 'history'", "has no history item")),
    Case("rating-output-1e5", _rating_output("1e5")),
    Case("rating-output-5-of-10", _rating_output("5/10")),
    Case("generation-output-empty", _data_check(users_bytes(with_output("")), {**TASK, "kind": "generation",
                                                                              "labels": None},
                                                "field 'history.0.output'", "must not be empty")),
    Case("generation-output-blank", _data_check(users_bytes(with_output(" \t")), {**TASK, "kind": "generation",
                                                                                 "labels": None},
                                                "field 'history.0.output'", "must not be empty")),
    Case("lone-surrogate-user-id", _data_check(users_bytes(USERS).replace(b'"u0"', b'"u\\ud800"', 1), TASK,
                                               "line 1", "field 'user_id'", "lone surrogate")),
    # 18. known failures at the edges end in a message naming the file
    Case("manifest-without-meta-row", _manifest("DELETE FROM meta WHERE key = 'salt'", "table meta has no row 'salt'"),
         True),
    Case("manifest-without-table", _manifest("DROP TABLE shares", "no such table: shares"), True),
    Case("split-names-an-unknown-user", _unknown_in_split, True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly(case, tmp_path, request, monkeypatch, cli):
    finished = request.getfixturevalue("finished_run") if case.needs_run else None
    monkeypatch.setenv("PERPCS_HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # `--out .` must find the current folder refused
    args, expect, out = case.build(tmp_path, finished)
    before = snapshot(tmp_path)
    result = cli(*args)
    output = result.output
    print(output)  # shown with `pytest -rP`: the messages a user sees
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


# --- cases whose fix is a behaviour ---


def test_export_replaces_a_previous_adapter_and_with_force_any_folder(finished_run, tmp_path, cli):
    run = run_copy(finished_run, tmp_path)
    out = tmp_path / "adapter"
    assert cli(*_export(run, out)).exit_code == 0
    first = load_file(out / "adapter_model.safetensors")
    assert cli(*_export(run, out)).exit_code == 0  # a previous adapter is replaced, by the same adapter
    second = load_file(out / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    notes = _notes(tmp_path, run)
    assert cli(*_export(run, notes), "--force").exit_code == 0
    assert sorted(p.name for p in notes.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    refused = cli(*_export(run, run / "pool"), "--force")  # --force never reaches into the run
    assert refused.exit_code == 2 and squash("is, holds or is inside") in squash(refused.output)


def test_atomic_dir_never_removes_what_it_did_not_create(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="mine: folder exists and is not empty"):
        with atomic_dir(tmp_path / "mine"):
            pytest.fail("the block must not run")
    (tmp_path / "file").write_text("keep")
    with pytest.raises(InputError, match="file: exists and is not a folder"):
        with atomic_dir(tmp_path / "file", replace=True):
            pass
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as tmp:  # an empty folder holds nothing to lose
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "mine"]


@pytest.mark.parametrize("fmt,files,gz", [
    ("annotator-csv",
     {**SOURCES["annotator-csv"], "texts.csv": b"\xef\xbb\xbf" + SOURCES["annotator-csv"]["texts.csv"]},
     set()),
    ("lamp", None, {"questions.json", "outputs.json"}),
    ("perpcs", None, {"users.json"}),
], ids=["csv-with-bom", "lamp-gz", "perpcs-gz"])
def test_bom_and_gz_are_read(fmt, files, gz, tmp_path, cli):
    paths = write_sources(fmt, tmp_path / "src", files, gz)
    result = cli(*_import(fmt, paths, tmp_path))
    assert result.exit_code == 0, result.output
    plain = write_sources(fmt, tmp_path / "plain")
    assert cli(*_import(fmt, plain, tmp_path / "p")).exit_code == 0
    assert (tmp_path / "out" / "users.jsonl").read_bytes() == (tmp_path / "p" / "out" / "users.jsonl").read_bytes()


def test_step0_interrupted_anywhere_resumes(finished_run, tmp_path, monkeypatch):
    run = run_copy(finished_run, tmp_path)
    fingerprint = (run / "task" / "fingerprint.json").read_text()
    # an older perpcs could stop between the merged folder and its fingerprint: step 0 is then not done
    (run / "task" / "fingerprint.json").unlink()
    Run(run).task_adapt()
    assert (run / "task" / "fingerprint.json").read_text() == fingerprint  # same seed, same model
    # a crash while the merged folder is written leaves no merged folder, so step 0 runs again
    shutil.rmtree(run / "task")
    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        Run(run).task_adapt()
    assert not (run / "task" / "merged").exists() and not list((run / "task").glob(".merged*"))
    monkeypatch.undo()
    Run(run).task_adapt()
    assert (run / "task" / "fingerprint.json").read_text() == fingerprint
    assert Run(run).open_pool()  # the pool made on that merged model opens against its fingerprint


def test_recipe_keeps_its_seconds_so_bench_needs_no_stats(finished_run, tmp_path):
    from perpcs.bench import Bench
    from perpcs.settings import BenchSettings

    run = Run(run_copy(finished_run, tmp_path))
    user = run.users(run.split["targets"])[0]
    recipe = Recipe.load(run.recipe_path(user.user_id))
    assert recipe.seconds is not None and recipe.seconds > 0
    stats = json.loads((run.folder / "stats.json").read_text())
    del stats["assemble"]  # as after a kill during step 5 and a resume
    write_json(run.folder / "stats.json", stats)
    bench = Bench(run, BenchSettings(methods=["perpcs"]), tmp_path / "b")
    bench.pool = run.open_pool()
    with bench.personalize("perpcs", user) as p:
        assert p.seconds == recipe.seconds


def test_recipe_refuses_nan_weights_and_unknown_mix():
    base = dict(pool_id="p", base_fingerprint="b", lora={"r": 2, "alpha": 4, "target_modules": ["q_proj"]}, top_k=1)
    with pytest.raises(ValueError, match="position 'l0', sharer 's1': weight inf is not a finite number"):
        Recipe(**base, pieces={"l0": [("s0", 0.5), ("s1", float("inf"))]})
    with pytest.raises(ValueError, match="mix"):
        Recipe(**base, mix="concat", pieces={})
    assert Recipe(**base, mix="cat", pieces={"l0": [("s0", 1.0)]}).mix == "cat"


def test_changed_data_is_refused_when_a_step_reads_it(finished_run, tmp_path):
    data = Path(shutil.copytree(json.loads((finished_run / "run.json").read_text())["data"], tmp_path / "data"))
    run = run_copy(finished_run, tmp_path)
    cfg = json.loads((run / "run.json").read_text())
    write_json(run / "run.json", {**cfg, "data": str(data)})
    lost = Run(run).split["targets"][0]
    Run(run).recipe_path(lost).unlink()
    (data / "users.jsonl").write_bytes((data / "users.jsonl").read_bytes().replace(b"\n", b"\n\n", 1))
    with pytest.raises(InputError, match="the data folder changed since run"):
        Run(run).assemble()


def test_a_second_process_is_refused_and_stats_are_not_lost(finished_run, tmp_path):
    from filelock import FileLock

    run = Run(run_copy(finished_run, tmp_path))
    other = FileLock(run.folder / "run.lock")  # another open file: flock treats it as another process
    with other:
        with pytest.raises(InputError, match="another perpcs process is working on this run folder"):
            run.record("x", {"seconds": 1})
        with pytest.raises(InputError, match="another perpcs process"):
            run.assemble()
    run.record("x", {"seconds": 1})
    assert run.stats()["x"] == {"seconds": 1} and "build_pool" in run.stats()


def test_leftover_temp_files_of_perpcs_are_removed_and_nothing_else(finished_run, tmp_path):
    run = Run(run_copy(finished_run, tmp_path))
    def leftover(tmp: Path) -> Path:  # what a kill (no `finally`) leaves: the temp name, another random part
        return tmp.with_name(tmp.name.replace(tmp.name.split(".perpcs-tmp.")[1][:8], "leftover"))

    with pytest.raises(RuntimeError):
        with atomic_dir(run.folder / "task" / "merged2") as tmp:
            (tmp / "x").write_text("half")
            shutil.copytree(tmp, leftover(tmp))
            raise RuntimeError
    with pytest.raises(RuntimeError):
        with atomic_path(run.folder / "stats.json") as tmp:
            tmp.write_text("{half")
            shutil.copy(tmp, leftover(tmp))
            raise RuntimeError
    leftovers = [p for p in run.folder.rglob("*perpcs-tmp*")]
    assert len(leftovers) == 2
    mine = [run.folder / ".merged.keep", run.folder / "notes.perpcs-tmp.txt", run.folder / "task" / ".merged.abcd1234"]
    for p in mine:
        p.write_text("user file")
    run.record("y", {})
    assert not any(p.exists() for p in leftovers)
    assert all(p.read_text() == "user file" for p in mine)
    assert remove_temp(run.folder) == []


def test_labels_fit_the_answer_budget_and_cut_answers_are_reported(caplog, tiny_base):
    from transformers import AutoTokenizer

    from conftest import ByteTokenizer
    from perpcs.tasks import Task, answer_budget, cut_short

    task = Task(name="hate", kind="classification", labels=["Hateful", "Non-hateful"], instruction="?",
                max_new_tokens=4)
    assert answer_budget(task, AutoTokenizer.from_pretrained(tiny_base)) == 5  # the issue's case: SmolLM2's tokens
    assert "max_new_tokens=4 is shorter than its longest label (5 tokens); generating 5 tokens" in caplog.text
    tok = ByteTokenizer()  # one token per byte: " Non-hateful" is 12 tokens
    assert answer_budget(task, tok) == 12
    assert answer_budget(task.model_copy(update={"max_new_tokens": 20}), tok) == 20
    gen = Task(name="g", kind="generation", instruction="?", max_new_tokens=4)
    caplog.clear()
    assert cut_short(gen, ["abcd", "ab", "abc", "wxyz"], tok, 4) == 0.5
    assert "50% of answers reached max_new_tokens=4" in caplog.text
    caplog.clear()
    assert cut_short(gen, ["ab"] * 30, tok, 4) == 0.0 and not caplog.text
