"""The pipeline's verbs over a run folder: `init`, `pipeline`, one per step (and `calibrate`), `export` and
`export-base`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from perpcs.commands import BASE, CONFIG, DATA, EXECUTOR, PRESET, RAY_ADDRESS, SEED, SHARERS, TARGETS, console


def run_command(all_steps: bool):
    def command(
        data: Path = DATA,
        run: Path = typer.Option(..., "--run", help="run folder to create or resume"),
        base: Optional[str] = BASE,
        seed: int = SEED,
        targets: Optional[int] = TARGETS,
        sharers: Optional[int] = SHARERS,
        config: Optional[Path] = CONFIG,
        preset: Optional[str] = PRESET,
        overrides: list[str] = typer.Option([], "--set", help="override a setting, e.g. --set assembly.top_k=5"),
        executor: str = EXECUTOR,
        ray_address: Optional[str] = RAY_ADDRESS,
    ) -> None:

        from perpcs.executors import make_executor
        from perpcs.overrides import build_config
        from perpcs.pipeline import Run

        if not all_steps and (executor != "local" or ray_address):
            raise ValueError("--executor and --ray-address are for perpcs pipeline: init runs no step")
        r = Run.create(run, build_config(data, base, seed, targets, sharers, config, overrides, preset=preset))
        if all_steps:
            recipes = r.pipeline(make_executor(executor, ray_address))
            console.print(f"wrote {len(recipes)} recipes to {r.folder / 'recipes'}, pool at {r.pool_path}")
        console.print(f"run folder: {r.folder} (settings in {r.folder / 'run.json'})")
    command.__doc__ = ("Steps 0-5 for a data folder into a run folder (resumable): task LoRA, sharers, pool, recipes."
                       if all_steps else "Create (or check) a run folder's settings without running any step.")
    return command


def step(name: str, doc: str):
    def command(run: Path = typer.Option(..., "--run",
                                         help="run folder made by `perpcs init` or `perpcs pipeline`")) -> None:
        from perpcs.pipeline import Run

        result = getattr(Run(run), name)()
        console.print(f"{name}: done ({type(result).__name__}) in {run}")
    command.__doc__ = doc
    return command


def calibrate_command(run: Path = typer.Option(..., "--run",
                                             help="run folder whose pool is built (`perpcs share`)")) -> None:
    """After step 4: the pool chooses its selection rule on validation users (or declines to personalize)."""
    from perpcs.pipeline import Run
    from perpcs.tables import calibration_lines

    r = Run(run)
    result = r.calibrate()
    if result is None:
        console.print(f"calibration is off in {r.folder / 'run.json'} (the rule is fixed); nothing to do")
        return
    print("\n".join(calibration_lines(result)))
    console.print(f"wrote {r.calibration_path} (a copy without predictions in {r.pool_path / 'calibration.json'})")


def share(run: Path = typer.Option(..., "--run"), executor: str = EXECUTOR,
          ray_address: Optional[str] = RAY_ADDRESS) -> None:
    """Steps 2-4: each sharer's LoRA, its gates, its pieces into the pool."""
    from perpcs.executors import make_executor
    from perpcs.pipeline import Run

    pool = Run(run).build_pool(make_executor(executor, ray_address))
    console.print(f"pool of {len(pool)} sharers at {pool.path}")


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

    r = Run(run)
    if (user is None) != (history is None):
        raise ValueError("--user and --history go together")
    if user is not None:
        r.assemble_history(user, load_history(history, r.data.task))
        console.print(f"wrote the recipe of {user!r} to {r.recipe_path(user)}")
        return
    ids = None if users is None else bulk_users(users, {u.user_id for u in r.data.users})
    recipes = r.assemble(ids, executor=make_executor(executor, ray_address))
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


def export(run: Path = typer.Option(..., "--run"), user: str = typer.Option(..., "--user"),
           out: Path = typer.Option(..., "--out",
                                    help="folder for the PEFT adapter (new, empty or a previous adapter)"),
           force: bool = typer.Option(False, "--force", help="replace a folder that holds other files")) -> None:
    """Write one target user's assembled PEFT as a standard peft adapter folder."""
    from perpcs.pipeline import Run

    path = Run(run).export(user, out, force)
    console.print(f"wrote PEFT adapter to {path} (load with peft.PeftModel.from_pretrained(merged_base, '{path}'))")


def export_base(run: Path = typer.Option(..., "--run"),
                out: Path = typer.Option(..., "--out", help="new folder for the merged base (HF format)")) -> None:
    """Write the run's merged, task-adapted base as a plain Hugging Face folder, the base of exported adapters."""
    from perpcs.pipeline import Run

    path = Run(run).export_base(out)
    console.print(f"wrote the merged base to {path} (serve it, e.g. vllm serve {path} --enable-lora)")
