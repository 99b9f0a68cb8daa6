"""What leaves a run for other tools: a target user's adapter (plain peft) and the merged base it applies to."""

from __future__ import annotations

import shutil
from pathlib import Path

from perpcs.recipe import ADAPTER_FILES, Recipe, export_adapter
from perpcs.runfolder import RunFolder
from perpcs.utils import atomic_dir, check_output_dir


def export_user(run: RunFolder, user_id: str, out: str | Path, force: bool = False) -> Path:
    """Write the user's assembled PEFT as a standard peft adapter folder. `out` may be new, empty or
    a previous adapter; another folder only with `force`; never the current folder, its parents,
    the run folder or the data folder (or anything in them)."""
    path = run.recipe_path(user_id)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no recipe for user {user_id!r}; run `perpcs assemble` first")
    check_output_dir(out, ADAPTER_FILES, (run.folder, Path(run.config.data)), force)
    return export_adapter(Recipe.load(path), run.open_pool(), out, str(run.merged_path.resolve()), replace=True)


def export_base(run: RunFolder, out: str | Path) -> Path:
    """The merged, task-adapted base folder copied as a plain HF folder (a new or empty one, outside the run and
    its data): what exported adapters apply to."""
    out = Path(out)
    check_output_dir(out, set(), (run.folder, Path(run.config.data)))
    with atomic_dir(out) as tmp:
        shutil.copytree(run.merged_path, tmp, dirs_exist_ok=True)
    return out
