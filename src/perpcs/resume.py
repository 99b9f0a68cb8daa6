"""What a bench keeps between its runs, so that an interrupted bench resumes at the row it stopped at.

The pipeline's steps already resume from the run folder; a bench's rows (a method's answers to every target's
queries, with its costs) are the rest of its time, an hour or more on the real sets. Each finished row is kept
in OUT/rows/<row>.json with a key of everything its answers depend on (the run's settings, the task model, the
bench settings that reach a row, the queries) and the hash of its answers, OUT/preds/<row>.json. A later bench
into the same folder reuses a row only when its key is equal and its answers are those it wrote; otherwise the
row runs again. The alternating cost timings are kept the same way (OUT/rows/costs.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from perpcs.data import format_validation_error
from perpcs.errors import InputError
from perpcs.utils import read_json, sha256_file, write_json


def kept(path: Path, key: dict, schema: type[BaseModel], preds: Path | None = None) -> dict | None:
    """The result kept at `path` under `key`, checked against `schema` (results.json's own for that section),
    or None if there is none, its key differs, or (given `preds`) the answers file is gone or is not the one
    the row wrote."""
    if not path.exists():
        return None
    saved = read_json(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("result"), dict) or "key" not in saved:
        raise InputError(f"{path}: not a row this bench kept (no 'key' and 'result'); delete it to run the row again")
    if saved["key"] != _plain(key):
        return None
    if preds is not None and (not preds.exists() or sha256_file(preds) != saved.get("preds_sha256")):
        return None
    try:
        schema.model_validate(saved["result"])
    except ValidationError as e:
        raise InputError(f"{format_validation_error(f'{path}: result', e)}; delete it to run the row again") from None
    return saved["result"]


def keep(path: Path, key: dict, result: dict, preds: Path | None = None) -> None:
    """Keep a finished row's (or the costs') result under its key, with its answers' hash; written whole or
    not at all."""
    write_json(path, {"key": _plain(key), "result": result, **({"preds_sha256": sha256_file(preds)} if preds else {})})


def _plain(key: dict) -> dict:
    """The key as it reads back from JSON (tuples become lists, keys text), so that equal keys compare equal."""
    return json.loads(json.dumps(key))
