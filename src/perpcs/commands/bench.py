"""`perpcs bench`, `curve`, `report` and `demo`: the methods side by side, and what the results say."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from perpcs.commands import BASE, CONFIG, DATA, PRESET, QUICK, SEED, SHARERS, TARGETS, console


def _bench(data: Path, out: Path, config, methods: list[str], variants: dict[str, dict],
           oppu_targets: Optional[int] = None) -> None:
    from perpcs.bench import bench
    from perpcs.overrides import check_variants
    from perpcs.settings import BenchSettings

    settings = BenchSettings(**({"methods": methods} if methods else {}), variants=variants, oppu_targets=oppu_targets)
    check_variants(config, variants)
    bench(data, out, config, settings)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}, "
                  f"{out / 'selection.png'} and predictions in {out / 'preds'}")
    print((out / "results.md").read_text())


def parse_seeds(spec: str) -> list[int]:
    """'0,1,2' or '0 1 2' -> [0, 1, 2]."""
    try:
        seeds = [int(x) for x in spec.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--seeds {spec!r}: expected whole numbers, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) < len(seeds):
        raise ValueError(f"--seeds {spec!r}: expected distinct seeds, e.g. --seeds 0,1,2")
    return seeds


def bench_command(
    data: Path = DATA,
    out: Path = typer.Option(..., "--out", help="output folder (results.json, results.md, preds/, run/)"),
    methods: list[str] = typer.Option([], "--methods", help="methods to run (repeat); default: all"),
    targets: Optional[int] = TARGETS,
    sharers: Optional[int] = SHARERS,
    seed: int = SEED,
    base: Optional[str] = BASE,
    quick: bool = QUICK,
    config: Optional[Path] = CONFIG,
    preset: Optional[str] = PRESET,
    overrides: list[str] = typer.Option([], "--set", help="override a setting, e.g. --set sharer_train.lr=5e-4"),
    variants: list[str] = typer.Option([], "--variant", help="also Per-Pcs with other step 3-5 settings on the same "
                                       "sharers (repeat), e.g. --variant act:key=activation,assembly.mix=cat"),
    oppu_targets: Optional[int] = typer.Option(None, "--oppu-targets", help="OPPU on the first M targets only "
                                               "(every other method on all; comparisons on the queries shared)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="several seeds, e.g. 0,1,2: one bench each into "
                                        "OUT/seed-N, then `perpcs report` of them all into OUT"),
) -> None:
    """Per-Pcs vs non-personalized, RAG, PEFT retrieval, OPPU and PriME on one data set, with costs and CIs."""

    from perpcs.overrides import build_config, parse_variants
    from perpcs.report import report

    runs = [(out / f"seed-{s}" if seeds else out, build_config(data, base, s, targets, sharers, config,
                                                               overrides, quick, preset))
            for s in (parse_seeds(seeds) if seeds else [seed])]
    for folder, cfg in runs:
        _bench(data, folder, cfg, methods, parse_variants(variants), oppu_targets)
    if seeds:
        report([folder for folder, _ in runs], out)
        console.print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'report.png'}")


def curve_command(
    data: Path = DATA,
    out: Path = typer.Option(..., "--out", help="output folder (curve.json, curve.md, curve.png, run/, k-*/)"),
    points: list[str] = typer.Option([], "--points", help="history items kept (repeat, or 1,2,4); default "
                                     "1,2,4,8,16,32,all"),
    targets: Optional[int] = TARGETS,
    sharers: Optional[int] = SHARERS,
    oppu_targets: Optional[int] = typer.Option(None, "--oppu-targets", help="OPPU on the first M targets only"),
    seed: int = SEED,
    base: Optional[str] = BASE,
    quick: bool = QUICK,
    config: Optional[Path] = CONFIG,
    overrides: list[str] = typer.Option([], "--set", help="override a setting, e.g. --set key=activation"),
) -> None:
    """Per-Pcs and OPPU when each target keeps only its newest 1, 2, 4, ... or all history items, with CIs."""

    from perpcs.curve import POINTS, curve, parse_points
    from perpcs.overrides import build_config

    cfg = build_config(data, base, seed, targets, sharers, config, overrides, quick)
    chosen = parse_points([p for spec in points for p in spec.split(",")] or list(POINTS))
    curve(data, out, cfg, chosen, oppu_targets)
    console.print(f"wrote {out / 'curve.json'}, {out / 'curve.md'} and {out / 'curve.png'}")
    print((out / "curve.md").read_text())


def report_command(
    folders: list[Path] = typer.Argument(..., help="`perpcs bench` output folders, one per seed"),
    out: Path = typer.Option(..., "--out", help="folder for report.json, report.md and report.png"),
) -> None:
    """Several bench runs (seeds) read together: every query pooled, paired by (seed, query id), with CIs and tests."""
    from perpcs.report import report

    report(folders, out)
    console.print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'report.png'}")
    print((out / "report.md").read_text())


def demo(out: Path = typer.Option(Path("runs/demo"), "--out"), seed: int = SEED) -> None:
    """Synthesise the built-in collaborative data set and run the full bench on it (about 15 minutes on 2 CPU cores)."""
    from perpcs.bench import OUTPUTS
    from perpcs.overrides import build_config
    from perpcs.settings import DEMO_CONFIG
    from perpcs.synth import save_synthetic, synthesize
    from perpcs.utils import check_output_dir

    data = out / "data"
    check_output_dir(out, OUTPUTS)  # before the data is written: a demo resumes only in its own folder
    check_output_dir(data, {"task.json", "users.jsonl", "groups.json"})  # the same seed writes the same data
    ds = synthesize("classification", n_users=DEMO_CONFIG["users"], n_queries=DEMO_CONFIG["queries"], seed=seed)
    save_synthetic(ds, data)
    console.print(f"wrote synthetic data to {data}")
    cfg = build_config(data, None, seed, None, None, None,
                       [f"{k}={json.dumps(v)}" for k, v in DEMO_CONFIG["run"].items()])
    _bench(data, out, cfg, DEMO_CONFIG["methods"], DEMO_CONFIG["variants"], DEMO_CONFIG["oppu_targets"])
