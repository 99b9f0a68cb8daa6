"""The `perpcs` command: one sub-command per step of the method, over the functions that do it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
model_app = typer.Typer(no_args_is_help=True, help="Base models: prepare (convert and cache) and inspect.")
data_app = typer.Typer(no_args_is_help=True, help="Per-user data sets: import public formats, synthesise, check.")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
console = Console(stderr=True)


def fail(msg: str) -> None:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


@data_app.command("check")
def data_check(folder: Path = typer.Argument(..., help="data folder with task.json and users.jsonl")) -> None:
    """Validate a data folder and print a summary."""
    from perpcs.data import load_dataset

    try:
        ds = load_dataset(folder)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    hist = [len(u.history) for u in ds.users]
    print(json.dumps({"task": ds.task.name, "kind": ds.task.kind, "users": len(ds.users),
                      "history_items": sum(hist), "min_history": min(hist), "max_history": max(hist),
                      "queries": sum(len(u.queries) for u in ds.users)}, indent=2))


# --- score (evaluation.py) ---

# --- data import (importers.py, lamp.py) ---

# --- data synth (synth.py) ---

# --- model (models.py) ---

# --- pipeline steps (pipeline.py) ---

# --- bench and demo (bench.py) ---
