"""`perpcs privacy`: membership and attribute attacks on a finished run (privacy.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from perpcs.commands import SEED, console


def privacy_cmd(
    run: Path = typer.Option(..., "--run", help="a finished run folder (pool and recipes)"),
    out: Path = typer.Option(..., "--out", help="folder for privacy.json, privacy.md and privacy.png"),
    oppu: Optional[Path] = typer.Option(None, "--oppu", help="folder of the targets' OPPU adapters (default RUN/oppu)"),
    members: int = typer.Option(16, "--members", help="training items drawn per sharer and target"),
    nonmembers: int = typer.Option(64, "--nonmembers", help="items drawn from held-out users"),
    targets: int = typer.Option(3, "--targets", help="targets whose assembled PEFT and OPPU are attacked"),
    sharers: Optional[int] = typer.Option(None, "--sharers", help="attack the first N sharers' pieces and keys "
                                          "(one forward pass each; every key still scores); default all"),
    seed: int = SEED,
    force: bool = typer.Option(False, "--force", help="write into a folder holding other files"),
    views: list[str] = typer.Option([], "--view", help="NAME=RUN: also the key and assembly attacks on a run "
                                    "derived from --run (e.g. a bench variant: OUT/variants/NAME/run); repeat"),
) -> None:
    """Membership and attribute attacks on a run's pool, keys and recipes, each beside a never-saw reference."""

    from perpcs.privacy import PrivacySettings, privacy

    pairs = [v.partition("=") for v in views]
    bad = [v for v, (name, sep, folder) in zip(views, pairs) if not (name and sep and folder)]
    if bad:
        raise ValueError(f"--view {bad[0]!r}: expected NAME=RUN_FOLDER")
    settings = PrivacySettings(members=members, nonmembers=nonmembers, targets=targets, sharers=sharers, seed=seed)
    privacy(run, out, settings, oppu, force, {name: folder for name, _, folder in pairs})
    console.print(f"wrote {out / 'privacy.json'}, {out / 'privacy.md'} and {out / 'privacy.png'}")
    print((out / "privacy.md").read_text())
