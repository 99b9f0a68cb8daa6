"""`perpcs data check|import|synth`, `perpcs model prepare` and `perpcs score`: data sets, bases and scoring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from perpcs.commands import console
from perpcs.utils import check_output_dir

FORCE = typer.Option(False, "--force", help="write into a folder that holds other files (a data set among them)")


def data_check(folder: Path = typer.Argument(..., help="data folder with task.json and users.jsonl")) -> None:
    """Validate a data folder and print a summary."""
    from perpcs.data import load_dataset

    ds = load_dataset(folder)
    hist = [len(u.history) for u in ds.users]
    print(json.dumps({"task": ds.task.name, "kind": ds.task.kind, "users": len(ds.users),
                      "history_items": sum(hist), "min_history": min(hist), "max_history": max(hist),
                      "queries": sum(len(u.queries) for u in ds.users)}, indent=2))


def score_cmd(
    task: str = typer.Option(..., help="preset (LaMP-1 .. LaMP-7), a task.json, or a data folder"),
    golds: Path = typer.Option(..., help="LaMP golds file {task, golds: [{id, output}]}"),
    preds: Path = typer.Option(..., help="predictions in the same format"),
) -> None:
    """Score predictions against golds exactly as LaMP does; print the JSON report."""
    from perpcs.evaluation import score_files

    report = score_files(task, golds, preds)
    print(json.dumps(report, indent=2))


def data_import(
    fmt: str = typer.Argument(..., metavar="FORMAT",
                              help="amazon-reviews, annotator-csv, lastfm-tags, papers-jsonl, lamp, perpcs"),
    sources: list[Path] = typer.Argument(..., metavar="SRC...",
                                         help="the data set's original files (or folder, for lastfm-tags)"),
    out: Path = typer.Option(..., "--out", help="data folder to write (task.json, users.jsonl): new or empty"),
    target: str = typer.Option("rating", "--target", help="amazon-reviews: rating (stars) or title (summary)"),
    label: str = typer.Option("valence", "--label", help="annotator-csv: the label column"),
    kind: str = typer.Option("rating", "--kind", help="annotator-csv: rating or classification"),
    top_tags: int = typer.Option(15, "--top-tags", help="lastfm-tags: labels = the N most used tags"),
    min_history: int = typer.Option(5, "--min-history", help="drop users with fewer history items"),
    queries: int = typer.Option(1, "--queries", help="held-out queries per user (its newest items)"),
    max_tokens: int = typer.Option(256, "--max-tokens", help="cut inputs to N whitespace-separated words (0: no cut)"),
    max_users: Optional[int] = typer.Option(None, "--max-users", help="keep the N most active users"),
    task: Optional[str] = typer.Option(None, "--task", help="lamp/perpcs: the LaMP task, e.g. LaMP-3"),
    seed: int = typer.Option(0, "--seed", help="orders items without timestamps (annotator-csv)"),
    force: bool = FORCE,
) -> None:
    """Import a public per-user data set into the data contract and report what was kept and dropped."""

    from perpcs.data import save_dataset
    from perpcs.importers import import_dataset
    from perpcs.records import ImportOptions

    opts = ImportOptions(target=target, label=label, kind=kind, top_tags=top_tags, min_history=min_history,
                         n_queries=queries, max_tokens=max_tokens or None, max_users=max_users, task=task, seed=seed)
    check_output_dir(out, set(), tuple(sources), force)  # never over a data set, nor over its own sources
    ds, report = import_dataset(fmt, sources, opts)
    save_dataset(ds, out)
    print(json.dumps(report.model_dump(), indent=2))
    console.print(f"kept {report.users_kept} of {report.users_found} users ({report.history_items} history items, "
                  f"{report.queries} queries); wrote {out}")


def data_synth(
    kind: str = typer.Option(..., help="classification (movie tags), rating (review scores) or generation (headlines)"),
    out: Path = typer.Option(..., help="folder to write task.json, users.jsonl and groups.json to: new or empty"),
    users: int = typer.Option(60, help="number of users"),
    seed: int = typer.Option(0, help="random seed: the same seed gives the same files"),
    history: tuple[int, int] = typer.Option((20, 60), help="min and max history items per user"),
    queries: int = typer.Option(4, help="held-out queries per user"),
    groups: int = typer.Option(4, help="number of hidden taste groups (at most 4)"),
    noise: float = typer.Option(0.1, help="chance that an answer departs from the user's group"),
    force: bool = FORCE,
) -> None:
    """Synthesise users whose hidden taste group decides their answers (the group goes to groups.json only)."""
    from collections import Counter

    from perpcs.synth import save_synthetic, synthesize

    check_output_dir(out, set(), force=force)
    ds = synthesize(kind, n_users=users, seed=seed, history=history, n_queries=queries, groups=groups, noise=noise)
    save_synthetic(ds, out)
    console.print(f"wrote task.json, users.jsonl and groups.json to {out}")
    print(json.dumps({"task": ds.task.name, "kind": ds.task.kind, "users": len(ds.users),
                      "history_items": sum(len(u.history) for u in ds.users),
                      "queries": sum(len(u.queries) for u in ds.users),
                      "group_sizes": dict(sorted(Counter(ds.groups.values()).items()))}, indent=2))

def model_prepare(base: Optional[str] = typer.Option(None, "--base", help="HF id, local HF folder or .gguf "
                                                    "(default: SmolLM2-135M-Instruct, offline)")) -> None:
    """Resolve, convert once (GGUF) and cache a base model; print what LoRA can target and its fingerprint."""
    from dataclasses import asdict

    from perpcs.models import describe, prepare_base

    info = describe(prepare_base(base))
    print(json.dumps(asdict(info), indent=2))
