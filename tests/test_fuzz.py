"""Fuzzing the readers of user files: the data contract loader and every importer, on mutated small
files (bytes flipped, inserted, cut; gzip too). Whatever the bytes, the only exception allowed is
`InputError`, whose message names the file; anything else would reach the user as a traceback."""

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perpcs.data import load_dataset
from perpcs.errors import InputError
from perpcs.importers import import_dataset
from small_sources import OPTS, SOURCES, TASK, USERS, data_folder, write_sources

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """`data` with a few random edits: a byte replaced, bytes inserted, a slice deleted, or cut short."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        if edit == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[at:at] = draw(st.sampled_from([b"\xff", b"\x00", b"\n", b'"', b",", b"\t", b"[", b"{", b"\xef\xbb\xbf",
                                                b"-1e999", b"1" * 5000, b"null", b"[" * 3000]))
        elif edit == "delete":
            del data[at:at + draw(st.integers(1, 20))]
        else:
            del data[at:]
    return bytes(data)


def _expect_clean(call, folder: Path):
    try:
        call()
    except InputError as e:
        assert str(folder) in str(e) or "usable user" in str(e), f"message names no file: {e}"


@pytest.mark.parametrize("fmt", list(SOURCES))
@given(data=st.data())
@FUZZ
def test_importers_raise_only_input_error(fmt, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp(fmt)
    name = data.draw(st.sampled_from(sorted(SOURCES[fmt])))
    broken = data.draw(mutated(SOURCES[fmt][name]))
    files = {**SOURCES[fmt], name: broken}
    if data.draw(st.booleans()):  # gzip the broken file, and maybe break the gzip stream instead
        files[name] = gzip.compress(broken, mtime=0)
        if data.draw(st.booleans()):
            files[name] = data.draw(mutated(files[name]))
    paths = write_sources(fmt, folder, files)
    _expect_clean(lambda: import_dataset(fmt, paths, OPTS), folder)


@given(data=st.data())
@FUZZ
def test_data_contract_raises_only_input_error(data, tmp_path_factory):
    which = data.draw(st.sampled_from(["task", "users"]))
    task, users = json.dumps(TASK).encode(), "".join(json.dumps(u) + "\n" for u in USERS).encode()
    folder = data_folder(tmp_path_factory.mktemp("d"), data.draw(mutated(task)) if which == "task" else task,
                         data.draw(mutated(users)) if which == "users" else users)
    _expect_clean(lambda: load_dataset(folder), folder)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda kids: (st.lists(kids, max_size=3)
                                         | st.dictionaries(st.text(max_size=5), kids, max_size=3)),
                           max_leaves=10)


@given(field=st.sampled_from(["user_id", "history", "queries", "profile", "input", "output", "id"]), value=json_values)
@FUZZ
def test_data_contract_fields_raise_only_input_error(field, value, tmp_path_factory):
    """Any JSON value in any field of a user line (top level, a history item or a query)."""
    user = json.loads(json.dumps(USERS[0]))
    target = user if field in ("user_id", "history", "queries", "profile") else \
        (user["queries"][0] if field == "id" else user["history"][0])
    target[field] = value
    folder = data_folder(tmp_path_factory.mktemp("d"), users=[user, USERS[1]])
    _expect_clean(lambda: load_dataset(folder), folder)
