"""The CLI's verbs, one module per group (`perpcs.cli` holds the command table), and what they share:
the error path and the options several verbs take."""

from __future__ import annotations

import functools

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from perpcs.errors import FILE_ERRORS, describe

# No markup, no highlighting: messages carry paths and user data, where `[...]` is text, not style.
console = Console(stderr=True, markup=False, highlight=False)


def fail(msg: str) -> None:
    """Every CLI error ends here: the message printed as plain text (never read as markup), exit 2."""
    console.print(Text.assemble(("error: ", "red"), str(msg)))
    raise typer.Exit(2)


# What a command may fail with on bad input or a bad environment (a full disk, a read-only folder): each ends
# in a message, never a traceback. Anything else is a bug in perpcs and keeps its traceback.
KNOWN = (ValueError, *FILE_ERRORS)


def message(e: BaseException) -> str:
    """The text of a known failure; an option model's field is named as its flag (`--cache-size 0: ...`)."""
    if isinstance(e, ValidationError):
        return "; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-')} {err.get('input')!r}: "
                         f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())
    return describe(e)


def guarded(command):
    """The CLI's one error boundary: a command whose known failures (`KNOWN`) end in `fail`."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KNOWN as e:
            fail(message(e))
    return run


EXECUTOR = typer.Option("local", "--executor", help="where sharers and bulk assembly run: local (this process) "
                        "or ray (a local Ray, or the cluster at --ray-address)")
RAY_ADDRESS = typer.Option(None, "--ray-address", help="Ray cluster to join, e.g. ray://head:10001 (docs/scale.md)")
DATA = typer.Option(..., "--data", help="data folder (task.json + users.jsonl)")
TARGETS = typer.Option(None, "--targets", help="number of target users (the most active)")
SHARERS = typer.Option(None, "--sharers", help="number of sharers S")
SEED = typer.Option(0, "--seed")
BASE = typer.Option(None, "--base", help="base model: HF id, folder or .gguf (default SmolLM2-135M-Instruct)")
QUICK = typer.Option(False, "--quick", help="tiny budgets: checks the harness, numbers mean nothing")
CONFIG = typer.Option(None, "--config", help="JSON file of RunConfig fields (settings.py)")
PRESET = typer.Option(None, "--preset", help="named settings under --config and --set: paper (the paper's rule), "
                      "private (for a privacy-sensitive pool, docs/privacy.md)")
