"""No silent garbage: drawn bad settings are refused before any training, drawn tampering of pieces and
recipes never exports, and the server and the CLI end known failures in a message (docs/validation.md).

The table of single cases is tests/test_bad_input.py; this module draws their classes and checks what
cannot be a CLI table row (HTTP answers, a full disk, a held lock, the key index).
"""

import errno
import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import get_args, get_origin

import pytest
import torch
from filelock import FileLock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from perpcs.errors import InputError
from perpcs.keyindex import KeyIndex
from perpcs.overrides import build_config
from perpcs.pipeline import Run
from perpcs.settings import RunConfig
from test_bad_input import each, edit_recipe, run_copy, squash, tamper_sharers, with_nan

# Settings for which 0 is a meaningful value (no clipping, no noise, no held-out items, ...); every other
# numeric setting is refused at 0, and every one at a negative, NaN, infinite, huge or non-numeric value.
ZERO_OK = {"grad_clip", "weight_decay", "val_fraction", "seed", "dropout", "strength", "key_noise", "base_fraction",
           "min_sharer_items", "dp_noise", "pick_by_loss"}
BAD = {"negative": ["-1", "-0.5", "-1e9"], "zero": ["0", "0.0"], "nan": ["NaN", "nan"],
       "inf": ["Infinity", "-Infinity", "inf"], "huge": ["1e30", "1" + "0" * 30],
       "wrong type": ["abc", "[1]", '{"a": 1}', "true"]}
SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def numeric_settings(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every int or float setting of a run, dotted as `--set` takes it."""
    out = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += numeric_settings(kind, f"{prefix}{name}.")
        elif get_origin(kind) is not list and {int, float} & set(get_args(kind) or (kind,)):
            out.append(prefix + name)
    return out


NUMERIC = numeric_settings()


def bad_values(name: str) -> list[str]:
    return [v for kind, values in BAD.items() if not (kind == "zero" and name.split(".")[-1] in ZERO_OK)
            for v in values]


def test_every_numeric_setting_has_a_constraint():
    assert len(NUMERIC) > 40 and "assembly.top_k" in NUMERIC and "sharer_train.lr" in NUMERIC
    for name in NUMERIC:
        for value in bad_values(name):
            with pytest.raises(InputError, match=f"--set {name}="):
                build_config("d", overrides=[f"{name}={value}"])
    for value in ("[NaN]", "[-1]", "[]", "[1e30]", "[0.5, true]"):  # the one list of numbers
        with pytest.raises(InputError, match=r"--set assembly\.strengths="):
            build_config("d", overrides=[f"assembly.strengths={value}"])


def test_a_list_setting_given_as_commas_is_refused_with_its_json_form():
    with pytest.raises(InputError, match=r'--set calibration\.rules=act-cat,paper: Input should be a valid list '
                                         r'\(a list is written in JSON: \["act-cat","paper"\]\)'):
        build_config("d", overrides=["calibration.rules=act-cat,paper"])
    assert build_config("d", overrides=['calibration.rules=["act-cat","paper"]']).calibration.rules == [
        "none", "act-cat", "paper"]


@pytest.fixture
def no_training(monkeypatch):
    def trained(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr("perpcs.pipeline.train_lora", trained)
    monkeypatch.setattr("perpcs.user_lora.train_lora", trained)


@settings(SLOW, max_examples=60)
@given(data=st.data())
def test_drawn_bad_settings_are_refused_before_any_training(data, cli, tiny_data, tiny_base, no_training):
    name = data.draw(st.sampled_from(NUMERIC))
    value = data.draw(st.sampled_from(bad_values(name)))
    with tempfile.TemporaryDirectory() as tmp:
        code, out = cli("pipeline", "--data", tiny_data, "--base", tiny_base, "--run", Path(tmp) / "run",
                        "--set", f"{name}={value}")
        assert code == 2 and squash(f"error: --set {name}={value}:") in squash(out), out
        assert "Traceback" not in out and not (Path(tmp) / "run").exists()


def light_copy(finished: Path, tmp: Path) -> Path:
    """What export reads of a run (settings, split, task fingerprint, pool, recipes); the merged model linked."""
    run = tmp / "run"
    shutil.copytree(finished, run, ignore=lambda d, names: [n for n in names if n == "merged"
                                                             or (n == "sharers" and Path(d) == finished)])
    (run / "task" / "merged").symlink_to(finished / "task" / "merged")
    return run


CORRUPTIONS = {"nan": with_nan, "inf": lambda t: t * float("inf"), "int8": lambda t: t.to(torch.int8),
               "float64": lambda t: t.double(), "lower rank": lambda t: t[:-1] if t.shape[0] > 1 else t.T,
               "narrower": lambda t: t[:, :-1], "transposed": lambda t: t.T, "overflow": lambda t: t * 1e39}


@SLOW
@given(part=st.sampled_from(["lora_A", "lora_B"]), how=st.sampled_from(sorted(CORRUPTIONS)))
def test_tampered_pieces_never_export(part, how, finished_run, cli):
    with tempfile.TemporaryDirectory() as tmp:
        run = light_copy(finished_run, Path(tmp))
        tamper_sharers(run / "pool", each(part, CORRUPTIONS[how]))
        user = json.loads((run / "split.json").read_text())["targets"][0]
        code, out = cli("export", "--run", run, "--user", user, "--out", Path(tmp) / "out")
        assert code == 2 and "Traceback" not in out and squash(str(run / "pool" / "sharers")) in squash(out), out
        assert f"{part}" in out and not (Path(tmp) / "out").exists()


RECIPE_EDITS = st.one_of(
    st.tuples(st.just("scale"), st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: not 0.98 < f < 1.02)),
    st.tuples(st.just("drop"), st.integers(1, 7)),
    st.tuples(st.just("twice"), st.none()),
    st.tuples(st.just("strength"), st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: not 0 <= f <= 10)),
    st.tuples(st.just("r"), st.integers(-2, 64).filter(lambda r: r != 8)),
    st.tuples(st.just("alpha"), st.one_of(st.none(), st.floats(allow_nan=True).filter(lambda a: a != 16))),
    st.tuples(st.just("modules"), st.lists(st.sampled_from(["q_proj", "k_proj", "gate_proj", "up_proj"]),
                                           max_size=4).filter(lambda m: m != ["q_proj", "k_proj", "v_proj", "o_proj"])),
    st.tuples(st.just("sharer"), st.text(max_size=8).map(lambda t: "x-" + t)),
    st.tuples(st.just("position"), st.text(min_size=1, max_size=12)),
)


def edit(recipe: dict, what: str, value) -> None:
    chosen = [c for c in recipe["pieces"].values() if c]
    if what == "scale":
        recipe["pieces"] = {p: [[s, w * value] for s, w in c] for p, c in recipe["pieces"].items()}
    elif what == "drop":
        recipe["pieces"] = dict(list(recipe["pieces"].items())[value:])
    elif what == "twice":
        recipe["pieces"] = {p: [[s, w / 2] for s, w in c] * 2 for p, c in recipe["pieces"].items()}
    elif what == "strength":
        recipe["strength"] = value
    elif what == "r":
        recipe["lora"]["r"] = value
    elif what == "alpha":
        recipe["lora"].pop("alpha") if value is None else recipe["lora"].update(alpha=value)
    elif what == "modules":
        recipe["lora"]["target_modules"] = value
    elif what == "sharer":
        chosen[0][0][0] = value
    else:
        recipe["pieces"][value] = chosen[0]


@settings(SLOW, max_examples=30)
@given(change=RECIPE_EDITS)
def test_tampered_recipes_never_export(change, finished_run, cli):
    with tempfile.TemporaryDirectory() as tmp:
        run = light_copy(finished_run, Path(tmp))
        user, path = edit_recipe(run, lambda r: edit(r, *change))
        code, out = cli("export", "--run", run, "--user", user, "--out", Path(tmp) / "out")
        assert code == 2 and "Traceback" not in out and squash(str(path)) in squash(out), (change, out)
        assert not (Path(tmp) / "out").exists()


# --- the key index and the keys ---


def test_key_index_is_checked_by_its_hash_and_keys_by_shape(finished_run, tmp_path):
    run = Run(run_copy(finished_run, tmp_path))
    pool = run.open_pool()
    index = KeyIndex.of(pool)
    pos = pool.positions[0]
    ids, keys = index.keys(pos)
    assert len(ids) > 1 and (ids, keys.tolist()) == (pool.keys(pos)[0], pool.keys(pos)[1].tolist())
    with safe_open(index.path, "pt") as f:  # rows flipped: another sharer's key for each candidate
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[f"{pos}.sharers"] = tensors[f"{pos}.sharers"].flip(0).contiguous()
    save_file(tensors, index.path, metadata=meta)
    with pytest.raises(InputError, match="the key index does not match the sha256 it was written with"):
        KeyIndex.of(pool)
    index.path.unlink()  # deleted, it is rebuilt from the sharer files
    assert KeyIndex.of(pool).keys(pos)[0] == ids
    tamper_sharers(run.pool_path, each(pool.key, lambda t: t[:-1]))  # a key of the wrong length
    pool = run.own_pool()
    with pytest.raises(InputError, match=rf"tensor {pos}\.activation: activation has shape"):
        pool.keys(pos)
    with pytest.raises(InputError, match="sharers/.*activation has shape"):
        pool.sharer_keys(pool.sharers()[0])


# --- the CLI's error boundary ---


def test_a_full_disk_names_the_file(finished_run, tmp_path, cli, monkeypatch):
    run = run_copy(finished_run, tmp_path)
    user = json.loads((run / "split.json").read_text())["targets"][0]
    full = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                           'left on device" })')
    monkeypatch.setattr("perpcs.recipe.save_file", lambda *a, **k: (_ for _ in ()).throw(full))
    code, out = cli("export", "--run", run, "--user", user, "--out", tmp_path / "out")
    assert code == 2 and squash(f"{tmp_path / 'out'}: could not be written") in squash(out) and "disk is full" in out
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    monkeypatch.setattr(Path, "write_text", no_space)
    code, out = cli("data", "synth", "--kind", "rating", "--out", tmp_path / "synth", "--users", "6")
    assert code == 2 and squash(f"{tmp_path / 'synth' / 'task.json'}: could not be written") in squash(out), out
    assert "(the disk is full)" in out and "Traceback" not in out


def test_assemble_honours_the_run_lock(finished_run, tmp_path, cli):
    run = run_copy(finished_run, tmp_path)
    (tmp_path / "h.jsonl").write_text(json.dumps({"input": "a film", "output": "comedy"}) + "\n")
    with FileLock(run / "run.lock"):  # another open file: flock treats it as another process
        code, out = cli("assemble", "--run", run, "--user", "newcomer", "--history", tmp_path / "h.jsonl")
    assert code == 2 and "another perpcs process is working on this run folder" in out
    assert not Run(run).recipe_path("newcomer").exists()


def test_serve_refuses_a_port_out_of_range(finished_run, cli):
    code, out = cli("serve", "--run", finished_run, "--port", "99999")
    assert code == 2 and "--port" in out and "65535" in out


def test_force_lets_synth_replace_a_data_folder_but_never_its_sources(tmp_path, cli):
    synth = ["data", "synth", "--kind", "rating", "--out", tmp_path / "d", "--users", "6"]
    assert cli(*synth).exit_code == 0
    before = (tmp_path / "d" / "users.jsonl").read_bytes()
    assert cli(*synth, "--seed", "1").exit_code == 2
    assert (tmp_path / "d" / "users.jsonl").read_bytes() == before
    assert cli(*synth, "--seed", "1", "--force").exit_code == 0
    assert (tmp_path / "d" / "users.jsonl").read_bytes() != before


# --- the server's error boundary ---


@pytest.fixture
def client(finished_run, tmp_path):
    from fastapi.testclient import TestClient

    from perpcs.serve import ServeSettings, create_app

    run = run_copy(finished_run, tmp_path)
    with TestClient(create_app(run, ServeSettings(batch_window_ms=0)), raise_server_exceptions=False) as c:
        c.run = Run(run)
        yield c


def raw(client, path: str, text: str):
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def test_http_422s_never_echo_what_json_cannot_hold(client):
    target = client.run.split["targets"][0]
    for body, field in [(f'{{"user": "{target}", "input": "x", "max_new_tokens": NaN}}', "max_new_tokens"),
                        (f'{{"user": "{target}", "input": "a \\ud800"}}', "input"),
                        ('{"user": "\\udc00", "input": "x"}', "user")]:
        r = raw(client, "/v1/generate", body)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field, r.text
    r = client.post("/v1/users/newcomer/assemble", json={"history": [{"input": " ", "output": "comedy"}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "history", 0, "input"]
    r = raw(client, "/v1/completions", f'{{"model": "{target}", "prompt": "a \\ud800", "max_tokens": NaN}}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    r = raw(client, "/v1/completions", f'{{"model": "{target}", "prompt": "a \\ud800"}}')
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"], r.text


def test_http_known_failures_are_409s_naming_the_file(client):
    run = client.run
    first, second = run.split["targets"][:2]
    recipe = run.recipe_path(second)
    before = recipe.read_bytes()
    r = client.post(f"/v1/users/{second}/assemble", json={"history": [{"input": "junk", "output": "comedy"}]})
    assert r.status_code == 409 and "is in the run's data set" in r.json()["detail"]
    assert client.delete(f"/v1/users/{second}").status_code == 409 and recipe.read_bytes() == before
    _, path = edit_recipe(run.folder, lambda rec: rec.update(pool_id="pool-ffffffffffffffff"))  # a foreign one
    r = client.post("/v1/generate", json={"user": first, "input": "a film", "max_new_tokens": 2})
    assert r.status_code == 409 and squash(f"{path}: recipe was assembled from pool pool-ffff") in squash(
        r.json()["detail"]), r.text
    recipe.write_bytes(b"PCSR\x01garbage")  # a corrupt recipe on disk
    for r in (client.get(f"/v1/users/{second}"),
              client.post("/v1/generate", json={"user": second, "input": "a film", "max_new_tokens": 2})):
        assert r.status_code == 409 and str(recipe) in r.json()["detail"], r.text


def read_only(monkeypatch) -> None:
    """What a read-only folder does to perpcs's writes (also as root, who may write anyway)."""
    def refused(*a, dir=None, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
    monkeypatch.setattr("perpcs.utils.tempfile.mkstemp", refused)
    monkeypatch.setattr("perpcs.utils.tempfile.mkdtemp", refused)


def test_http_read_only_run_folder_is_a_409(client, monkeypatch):
    read_only(monkeypatch)
    r = client.post("/v1/users/newcomer/assemble", json={"history": [{"input": "a film", "output": "comedy"}]})
    assert r.status_code == 409, r.text
    assert squash(f"{client.run.recipe_path('newcomer')}: could not be written: {client.run.folder / 'recipes'}: "
                  "Permission denied") in squash(r.json()["detail"])


def test_cli_read_only_run_folder_names_the_file(finished_run, tmp_path, cli, monkeypatch):
    run = run_copy(finished_run, tmp_path)
    (tmp_path / "h.jsonl").write_text(json.dumps({"input": "a film", "output": "comedy"}) + "\n")
    read_only(monkeypatch)
    code, out = cli("assemble", "--run", run, "--user", "newcomer", "--history", tmp_path / "h.jsonl")
    assert code == 2 and "could not be written" in out and "Permission denied" in out and "Traceback" not in out

    def no_lock(self, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), self.lock_file)
    monkeypatch.setattr(FileLock, "acquire", no_lock)
    code, out = cli("assemble", "--run", run)
    assert code == 2 and squash(f"{run / 'run.lock'}: cannot take the run's lock (Permission denied)") in squash(out)


def test_http_a_fault_is_a_logged_json_500(client, caplog, monkeypatch):
    service = client.app.state.service
    monkeypatch.setattr(service, "assemble", lambda *a: 1 / 0)
    r = client.post("/v1/users/newcomer/assemble", json={"history": [{"input": "a film", "output": "comedy"}]})
    assert r.status_code == 500 and r.json() == {"detail": "internal server error (the server's log has the details)"}
    assert "ZeroDivisionError" in caplog.text
    monkeypatch.setattr(service, "generate", lambda rows: 1 / 0)
    user = client.run.split["targets"][0]
    r = client.post("/v1/completions", json={"model": user, "prompt": "x", "max_tokens": 1})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text


def test_tampered_manifest_in_python_names_the_manifest(finished_run, tmp_path):
    run = Run(run_copy(finished_run, tmp_path))
    db = sqlite3.connect(run.pool_path / "pool.sqlite")
    with db:
        db.execute("DELETE FROM meta WHERE key = 'lora_config'")
    db.close()
    with pytest.raises(InputError, match=r"pool.sqlite: not a perpcs pool manifest \(table meta has no row "):
        run.own_pool()
