"""The `perpcs` command: one sub-command per step of the method, over the functions that do it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
model_app = typer.Typer(no_args_is_help=True, help="Base models: prepare (convert and cache) and inspect.")
data_app = typer.Typer(no_args_is_help=True, help="Per-user data sets: import public formats, synthesise, check.")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
# No markup, no highlighting: messages carry paths and user data, where `[...]` is text, not style.
console = Console(stderr=True, markup=False, highlight=False)


def fail(msg: str) -> None:
    """Every CLI error ends here: the message printed as plain text (never read as markup), exit 2."""
    console.print(Text.assemble(("error: ", "red"), str(msg)))
    raise typer.Exit(2)


@data_app.command("check")
def data_check(folder: Path = typer.Argument(..., help="data folder with task.json and users.jsonl")) -> None:
    """Validate a data folder and print a summary."""
    from perpcs.data import load_dataset

    try:
        ds = load_dataset(folder)
    except (ValueError, OSError) as e:
        fail(str(e))
    hist = [len(u.history) for u in ds.users]
    print(json.dumps({"task": ds.task.name, "kind": ds.task.kind, "users": len(ds.users),
                      "history_items": sum(hist), "min_history": min(hist), "max_history": max(hist),
                      "queries": sum(len(u.queries) for u in ds.users)}, indent=2))


# --- score (evaluation.py) ---


@app.command("score")
def score_cmd(
    task: str = typer.Option(..., help="preset (LaMP-1 .. LaMP-7), a task.json, or a data folder"),
    golds: Path = typer.Option(..., help="LaMP golds file {task, golds: [{id, output}]}"),
    preds: Path = typer.Option(..., help="predictions in the same format"),
) -> None:
    """Score predictions against golds exactly as LaMP does; print the JSON report."""
    from perpcs.evaluation import score_files

    try:
        report = score_files(task, golds, preds)
    except (ValueError, OSError) as e:
        fail(str(e))
    print(json.dumps(report, indent=2))


# --- data import (importers.py, lamp.py) ---
@data_app.command("import")
def data_import(
    fmt: str = typer.Argument(..., metavar="FORMAT",
                              help="amazon-reviews, annotator-csv, lastfm-tags, papers-jsonl, lamp, perpcs"),
    sources: list[Path] = typer.Argument(..., metavar="SRC...",
                                         help="the data set's original files (or folder, for lastfm-tags)"),
    out: Path = typer.Option(..., "--out", help="data folder to write (task.json, users.jsonl)"),
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
) -> None:
    """Import a public per-user data set into the data contract and report what was kept and dropped."""
    from pydantic import ValidationError

    from perpcs.data import format_validation_error, save_dataset
    from perpcs.importers import ImportOptions, import_dataset

    try:
        opts = ImportOptions(target=target, label=label, kind=kind, top_tags=top_tags, min_history=min_history,
                             n_queries=queries, max_tokens=max_tokens or None, max_users=max_users, task=task,
                             seed=seed)
    except ValidationError as e:
        fail(format_validation_error("options", e))
    try:
        ds, report = import_dataset(fmt, sources, opts)
        save_dataset(ds, out)
    except (ValueError, OSError) as e:
        fail(str(e))
    print(json.dumps(report.model_dump(), indent=2))
    console.print(f"kept {report.users_kept} of {report.users_found} users ({report.history_items} history items, "
                  f"{report.queries} queries); wrote {out}")


# --- data synth (synth.py) ---


@data_app.command("synth")
def data_synth(
    kind: str = typer.Option(..., help="classification (movie tags), rating (review scores) or generation (headlines)"),
    out: Path = typer.Option(..., help="folder to write task.json, users.jsonl and groups.json to"),
    users: int = typer.Option(60, help="number of users"),
    seed: int = typer.Option(0, help="random seed: the same seed gives the same files"),
    history: tuple[int, int] = typer.Option((20, 60), help="min and max history items per user"),
    queries: int = typer.Option(4, help="held-out queries per user"),
    groups: int = typer.Option(4, help="number of hidden taste groups (at most 4)"),
    noise: float = typer.Option(0.1, help="chance that an answer departs from the user's group"),
) -> None:
    """Synthesise users whose hidden taste group decides their answers (the group goes to groups.json only)."""
    from collections import Counter

    from perpcs.synth import save_synthetic, synthesize

    try:
        ds = synthesize(kind, n_users=users, seed=seed, history=history, n_queries=queries, groups=groups,
                        noise=noise)
        save_synthetic(ds, out)
    except ValueError as e:
        fail(str(e))
    console.print(f"wrote task.json, users.jsonl and groups.json to {out}")
    print(json.dumps({"task": ds.task.name, "kind": ds.task.kind, "users": len(ds.users),
                      "history_items": sum(len(u.history) for u in ds.users),
                      "queries": sum(len(u.queries) for u in ds.users),
                      "group_sizes": dict(sorted(Counter(ds.groups.values()).items()))}, indent=2))

# --- model (models.py) ---
@model_app.command("prepare")
def model_prepare(base: Optional[str] = typer.Option(None, "--base", help="HF id, local HF folder or .gguf (default: SmolLM2-135M-Instruct, offline)")) -> None:
    """Resolve, convert once (GGUF) and cache a base model; print what LoRA can target and its fingerprint."""
    from dataclasses import asdict

    from perpcs.models import describe, prepare_base

    try:
        info = describe(prepare_base(base))
    except (ValueError, OSError) as e:
        fail(str(e))
    print(json.dumps(asdict(info), indent=2))

# --- pipeline steps (pipeline.py) ---
def parse_overrides(pairs: list[str]) -> dict:
    """`--set a.b=value` pairs into a nested dict (values parsed as JSON when they parse, else text)."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. sharer_train.lr=5e-4")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def build_config(data: Path, base: Optional[str], seed: int, targets: Optional[int], sharers: Optional[int],
                 config: Optional[Path], overrides: list[str], preset: Optional[str] = None):
    """A RunConfig from defaults < --preset < --config file < flags < --set overrides (nested sections merge
    key by key)."""
    from perpcs.pipeline import PRESETS, RunConfig
    from perpcs.utils import deep_merge, read_json

    if preset is not None and preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: known presets are {', '.join(PRESETS)}")
    flags = {"data": str(data), "seed": seed, "base": base, "n_targets": targets, "n_sharers": sharers}
    cfg = RunConfig(data=str(data)).model_dump()
    del cfg["assembly"]["retrieval_copies"]  # unset: it follows `retrieval_copies` unless a layer sets it
    for layer in (PRESETS.get(preset, {}), read_json(config) if config else {},
                  {k: v for k, v in flags.items() if v is not None}, parse_overrides(overrides)):
        deep_merge(cfg, layer)
    return RunConfig.model_validate(cfg)


EXECUTOR = typer.Option("local", "--executor", help="where sharers and bulk assembly run: local (this process) "
                        "or ray (a local Ray, or the cluster at --ray-address)")
RAY_ADDRESS = typer.Option(None, "--ray-address", help="Ray cluster to join, e.g. ray://head:10001 (docs/scale.md)")
PRESET = typer.Option(None, "--preset", help="named settings under --config and --set: paper (the paper's rule), "
                      "private (for a privacy-sensitive pool, docs/privacy.md)")


def _run_command(all_steps: bool):
    def command(
        data: Path = typer.Option(..., "--data", help="data folder (task.json + users.jsonl)"),
        run: Path = typer.Option(..., "--run", help="run folder to create or resume"),
        base: Optional[str] = typer.Option(None, "--base", help="base model: HF id, folder or .gguf (default SmolLM2-135M-Instruct)"),
        seed: int = typer.Option(0, "--seed"),
        targets: Optional[int] = typer.Option(None, "--targets", help="number of target users (the most active)"),
        sharers: Optional[int] = typer.Option(None, "--sharers", help="number of sharers S"),
        config: Optional[Path] = typer.Option(None, "--config", help="JSON file of RunConfig fields"),
        overrides: list[str] = typer.Option([], "--set", help="override a setting, e.g. --set assembly.top_k=5"),
        preset: Optional[str] = PRESET,
        executor: str = EXECUTOR,
        ray_address: Optional[str] = RAY_ADDRESS,
    ) -> None:
        from pydantic import ValidationError

        from perpcs.executors import make_executor
        from perpcs.pipeline import Run

        try:
            if not all_steps and (executor != "local" or ray_address):
                raise ValueError("--executor and --ray-address are for perpcs pipeline: init runs no step")
            r = Run.create(run, build_config(data, base, seed, targets, sharers, config, overrides, preset))
            if all_steps:
                recipes = r.pipeline(make_executor(executor, ray_address))
                console.print(f"wrote {len(recipes)} recipes to {r.folder / 'recipes'}, pool at {r.pool_path}")
        except (ValueError, OSError, ValidationError) as e:
            fail(str(e))
        console.print(f"run folder: {r.folder} (settings in {r.folder / 'run.json'})")
    command.__doc__ = ("Steps 0-5 for a data folder into a run folder (resumable): task LoRA, sharers, pool, recipes."
                       if all_steps else "Create (or check) a run folder's settings without running any step.")
    return command


app.command("init")(_run_command(False))
app.command("pipeline")(_run_command(True))


def _step(name: str, doc: str):
    def command(run: Path = typer.Option(..., "--run", help="run folder made by `perpcs init` or `perpcs pipeline`")) -> None:
        from perpcs.pipeline import Run

        try:
            result = getattr(Run(run), name)()
        except (ValueError, OSError) as e:
            fail(str(e))
        console.print(f"{name}: done ({type(result).__name__}) in {run}")
    command.__doc__ = doc
    return command


app.command("task-adapt")(_step("task_adapt", "Step 0: train the task LoRA on the base users and merge it."))
app.command("select")(_step("select", "Step 1: choose the sharers (saved with the reason for each)."))


@app.command("share")
def share(run: Path = typer.Option(..., "--run"), executor: str = EXECUTOR,
          ray_address: Optional[str] = RAY_ADDRESS) -> None:
    """Steps 2-4: each sharer's LoRA, its gates, its pieces into the pool."""
    from perpcs.executors import make_executor
    from perpcs.pipeline import Run

    try:
        pool = Run(run).build_pool(make_executor(executor, ray_address))
    except (ValueError, OSError) as e:
        fail(str(e))
    console.print(f"pool of {len(pool)} sharers at {pool.path}")


@app.command("assemble")
def assemble(
    run: Path = typer.Option(..., "--run"),
    user: Optional[str] = typer.Option(None, "--user", help="with --history: a user who need not be in the run's data"),
    history: Optional[Path] = typer.Option(None, "--history", help="that user's history, JSONL of {input, output}"),
    users: Optional[str] = typer.Option(None, "--users", help="FILE (one user id a line) or 'all' (every user of "
                                        "the data set); default: the run's target users"),
    executor: str = EXECUTOR,
    ray_address: Optional[str] = RAY_ADDRESS,
) -> None:
    """Step 5: a recipe per user from their history, no training; model and pool opened once for all users
    (or for --user from --history: a user who need not be in the run's data)."""
    from perpcs.data import load_history
    from perpcs.executors import make_executor
    from perpcs.pipeline import Run

    try:
        r = Run(run)
        if (user is None) != (history is None):
            raise ValueError("--user and --history go together")
        if user is not None:
            r.assemble_history(user, load_history(history, r.data.task))
            console.print(f"wrote the recipe of {user!r} to {r.recipe_path(user)}")
            return
        ids = None if users is None else bulk_users(users, {u.user_id for u in r.data.users})
        recipes = r.assemble(ids, executor=make_executor(executor, ray_address))
    except (ValueError, OSError, KeyError) as e:
        fail(str(e))
    rate = r.stats().get("assemble", {}).get("users_per_hour")
    console.print(f"wrote {len(recipes)} recipes to {r.folder / 'recipes'}"
                  + (f" ({rate:.0f} users per hour, in {r.folder / 'stats.json'})" if rate else " (all there already)"))


def bulk_users(spec: str, known: set[str]) -> list[str]:
    """`--users`: 'all', or a file of user ids, one a line (blank lines skipped), each checked against the data."""
    if spec == "all":
        return sorted(known)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--users {spec}: no such file (give a file of user ids, one a line, or 'all')")
    from perpcs.utils import text_lines

    ids = []
    for lineno, line in text_lines(path):
        if line.strip():
            if line.strip() not in known:
                raise ValueError(f"{path}: line {lineno}: no user {line.strip()!r} in the run's data set")
            ids.append(line.strip())
    if not ids:
        raise ValueError(f"{path}: no user ids")
    return list(dict.fromkeys(ids))


@app.command("export")
def export(run: Path = typer.Option(..., "--run"), user: str = typer.Option(..., "--user"),
           out: Path = typer.Option(..., "--out", help="folder for the PEFT adapter (new, empty or a previous adapter)"),
           force: bool = typer.Option(False, "--force", help="replace a folder that holds other files")) -> None:
    """Write one target user's assembled PEFT as a standard peft adapter folder."""
    from perpcs.pipeline import Run

    try:
        path = Run(run).export(user, out, force)
    except (ValueError, OSError) as e:
        fail(str(e))
    console.print(f"wrote PEFT adapter to {path} (load with peft.PeftModel.from_pretrained(merged_base, '{path}'))")


@app.command("export-base")
def export_base(run: Path = typer.Option(..., "--run"),
                out: Path = typer.Option(..., "--out", help="new folder for the merged base (HF format)")) -> None:
    """Write the run's merged, task-adapted base as a plain Hugging Face folder, the base of exported adapters."""
    from perpcs.pipeline import Run

    try:
        path = Run(run).export_base(out)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        fail(str(e))
    console.print(f"wrote the merged base to {path} (serve it, e.g. vllm serve {path} --enable-lora)")

# --- bench and demo (bench.py) ---
QUICK = ["task_train.steps=4", "sharer_train.steps=3", "gate_train.steps=2", "n_targets=2", "n_sharers=3",
         "min_sharer_items=1"]


def parse_variants(specs: list[str]) -> dict[str, dict]:
    """'NAME:KEY=VALUE,KEY=VALUE' -> {NAME: nested settings}, e.g. 'act:key=activation,assembly.mix=cat'."""
    out = {}
    for spec in specs:
        name, sep, pairs = spec.partition(":")
        if not sep or not name or not pairs:
            raise ValueError(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
        out[name] = parse_overrides(pairs.split(","))
    return out


def _bench(data: Path, out: Path, config, methods: list[str], variants: dict[str, dict],
           oppu_targets: Optional[int] = None) -> None:
    from perpcs.bench import BenchSettings, bench

    settings = BenchSettings(**({"methods": methods} if methods else {}), variants=variants, oppu_targets=oppu_targets)
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


@app.command("bench")
def bench_command(
    data: Path = typer.Option(..., "--data", help="data folder (task.json + users.jsonl)"),
    out: Path = typer.Option(..., "--out", help="output folder (results.json, results.md, preds/, run/)"),
    methods: list[str] = typer.Option([], "--methods", help="methods to run (repeat); default: all"),
    targets: Optional[int] = typer.Option(None, "--targets", help="number of target users (the most active)"),
    sharers: Optional[int] = typer.Option(None, "--sharers", help="number of sharers S"),
    seed: int = typer.Option(0, "--seed"),
    base: Optional[str] = typer.Option(None, "--base", help="base model (default SmolLM2-135M-Instruct)"),
    quick: bool = typer.Option(False, "--quick", help="tiny budgets: checks the harness, numbers mean nothing"),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON file of RunConfig fields"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting, e.g. --set sharer_train.lr=5e-4"),
    variants: list[str] = typer.Option([], "--variant", help="also Per-Pcs with other step 3-5 settings on the same "
                                       "sharers (repeat), e.g. --variant act:key=activation,assembly.mix=cat"),
    oppu_targets: Optional[int] = typer.Option(None, "--oppu-targets", help="OPPU on the first M targets only "
                                               "(every other method on all; comparisons on the queries shared)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="several seeds, e.g. 0,1,2: one bench each into "
                                        "OUT/seed-N, then `perpcs report` of them all into OUT"),
    preset: Optional[str] = PRESET,
) -> None:
    """Per-Pcs vs non-personalized, RAG, PEFT retrieval, OPPU and PriME on one data set, with costs and CIs."""
    from pydantic import ValidationError

    from perpcs.report import report

    try:
        runs = [(out / f"seed-{s}" if seeds else out, build_config(data, base, s, targets, sharers, config,
                                                                   (QUICK if quick else []) + overrides, preset))
                for s in (parse_seeds(seeds) if seeds else [seed])]
        for folder, cfg in runs:
            _bench(data, folder, cfg, methods, parse_variants(variants), oppu_targets)
        if seeds:
            report([folder for folder, _ in runs], out)
            console.print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'report.png'}")
    except (ValueError, OSError, ValidationError) as e:
        fail(str(e))


@app.command("curve")
def curve_command(
    data: Path = typer.Option(..., "--data", help="data folder (task.json + users.jsonl)"),
    out: Path = typer.Option(..., "--out", help="output folder (curve.json, curve.md, curve.png, run/, k-*/)"),
    points: list[str] = typer.Option([], "--points", help="history items kept (repeat, or 1,2,4); default "
                                     "1,2,4,8,16,32,all"),
    targets: Optional[int] = typer.Option(None, "--targets", help="number of target users (the most active)"),
    sharers: Optional[int] = typer.Option(None, "--sharers", help="number of sharers S"),
    oppu_targets: Optional[int] = typer.Option(None, "--oppu-targets", help="OPPU on the first M targets only"),
    seed: int = typer.Option(0, "--seed"),
    base: Optional[str] = typer.Option(None, "--base", help="base model (default SmolLM2-135M-Instruct)"),
    quick: bool = typer.Option(False, "--quick", help="tiny budgets: checks the harness, numbers mean nothing"),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON file of RunConfig fields"),
    overrides: list[str] = typer.Option([], "--set", help="override a setting, e.g. --set key=activation"),
) -> None:
    """Per-Pcs and OPPU when each target keeps only its newest 1, 2, 4, ... or all history items, with CIs."""
    from pydantic import ValidationError

    from perpcs.curve import POINTS, curve, parse_points

    try:
        cfg = build_config(data, base, seed, targets, sharers, config, (QUICK if quick else []) + overrides)
        chosen = parse_points([p for spec in points for p in spec.split(",")] or list(POINTS))
        curve(data, out, cfg, chosen, oppu_targets)
    except (ValueError, OSError, ValidationError) as e:
        fail(str(e))
    console.print(f"wrote {out / 'curve.json'}, {out / 'curve.md'} and {out / 'curve.png'}")
    print((out / "curve.md").read_text())


@app.command("report")
def report_command(
    folders: list[Path] = typer.Argument(..., help="`perpcs bench` output folders, one per seed"),
    out: Path = typer.Option(..., "--out", help="folder for report.json, report.md and report.png"),
) -> None:
    """Several bench runs (seeds) read together: every query pooled, paired by (seed, query id), with CIs and tests."""
    from perpcs.report import report

    try:
        report(folders, out)
    except (ValueError, OSError) as e:
        fail(str(e))
    console.print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'report.png'}")
    print((out / "report.md").read_text())


@app.command("demo")
def demo(out: Path = typer.Option(Path("runs/demo"), "--out"), seed: int = typer.Option(0, "--seed")) -> None:
    """Synthesise the built-in collaborative data set and run the full bench on it (about 15 minutes on 2 CPU cores)."""
    from perpcs.bench import DEMO_CONFIG
    from perpcs.synth import save_synthetic, synthesize

    data = out / "data"
    save_synthetic(synthesize("classification", n_users=DEMO_CONFIG["users"], n_queries=DEMO_CONFIG["queries"], seed=seed), data)
    console.print(f"wrote synthetic data to {data}")
    cfg = build_config(data, None, seed, None, None, None, [f"{k}={json.dumps(v)}" for k, v in DEMO_CONFIG["run"].items()])
    _bench(data, out, cfg, [], DEMO_CONFIG["variants"])


# --- privacy (privacy.py) ---
@app.command("privacy")
def privacy_cmd(
    run: Path = typer.Option(..., "--run", help="a finished run folder (pool and recipes)"),
    out: Path = typer.Option(..., "--out", help="folder for privacy.json, privacy.md and privacy.png"),
    oppu: Optional[Path] = typer.Option(None, "--oppu", help="folder of the targets' OPPU adapters (default RUN/oppu)"),
    members: int = typer.Option(16, "--members", help="training items drawn per sharer and target"),
    nonmembers: int = typer.Option(64, "--nonmembers", help="items drawn from held-out users"),
    targets: int = typer.Option(3, "--targets", help="targets whose assembled PEFT and OPPU are attacked"),
    sharers: Optional[int] = typer.Option(None, "--sharers", help="attack the first N sharers' pieces and keys "
                                          "(one forward pass each; every key still scores); default all"),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="write into a folder holding other files"),
    views: list[str] = typer.Option([], "--view", help="NAME=RUN: also the key and assembly attacks on a run "
                                    "derived from --run (e.g. a bench variant: OUT/variants/NAME/run); repeat"),
) -> None:
    """Membership and attribute attacks on a run's pool, keys and recipes, each beside a never-saw reference."""
    from pydantic import ValidationError

    from perpcs.privacy import PrivacySettings, privacy

    try:
        pairs = [v.partition("=") for v in views]
        bad = [v for v, (name, sep, folder) in zip(views, pairs) if not (name and sep and folder)]
        if bad:
            raise ValueError(f"--view {bad[0]!r}: expected NAME=RUN_FOLDER")
        settings = PrivacySettings(members=members, nonmembers=nonmembers, targets=targets, sharers=sharers, seed=seed)
        privacy(run, out, settings, oppu, force, {name: folder for name, _, folder in pairs})
    except (ValueError, OSError, ValidationError) as e:
        fail(str(e))
    console.print(f"wrote {out / 'privacy.json'}, {out / 'privacy.md'} and {out / 'privacy.png'}")
    print((out / "privacy.md").read_text())


# --- serve (serve.py) ---
@app.command("serve")
def serve_cmd(
    run: Path = typer.Option(..., "--run", help="run folder with a pool (recipes are written to RUN/recipes)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; beyond loopback an API key is required"),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PERPCS_API_KEY",
                                          help="required in the X-API-Key header of every /v1 request"),
    cache_size: int = typer.Option(8, "--cache-size", help="materialised adapters kept in memory (LRU)"),
    max_batch: int = typer.Option(8, "--max-batch", help="generate requests answered together (1: one at a time)"),
    batch_window_ms: float = typer.Option(10.0, "--batch-window-ms", help="how long a batch waits for more requests"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="largest max_new_tokens a request may ask"),
) -> None:
    """Serve assembly and personalized generation over HTTP (FastAPI + uvicorn)."""
    from pydantic import ValidationError

    from perpcs.serve import ServeSettings, check_host, serve

    try:
        settings = ServeSettings(api_key=api_key, cache_size=cache_size, max_batch=max_batch,
                                 batch_window_ms=batch_window_ms, max_new_tokens=max_new_tokens)
        check_host(host, api_key)
        console.print(f"serving {run} on http://{host}:{port} (docs at /docs)", markup=False)
        serve(run, host, port, settings)
    except (ValueError, FileNotFoundError, ValidationError) as e:
        fail(str(e))
