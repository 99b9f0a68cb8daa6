"""The `perpcs` command: one sub-command per step of the method, over the functions that do it."""

from __future__ import annotations

import typer

from perpcs.commands import bench, data, guarded, privacy, run, serve

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
model_app = typer.Typer(no_args_is_help=True, help="Base models: prepare (convert and cache) and inspect.")
data_app = typer.Typer(no_args_is_help=True, help="Per-user data sets: import public formats, synthesise, check.")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")

# (group, verb, function), in the order `perpcs --help` lists them
COMMANDS = [
    (data_app, "check", data.data_check),
    (app, "score", data.score_cmd),
    (data_app, "import", data.data_import),
    (data_app, "synth", data.data_synth),
    (model_app, "prepare", data.model_prepare),
    (app, "init", run.run_command(all_steps=False)),
    (app, "pipeline", run.run_command(all_steps=True)),
    (app, "task-adapt", run.step("task_adapt", "Step 0: train the task LoRA on the base users and merge it.")),
    (app, "select", run.step("select", "Step 1: choose the sharers (saved with the reason for each).")),
    (app, "calibrate", run.calibrate_command),
    (app, "share", run.share),
    (app, "assemble", run.assemble),
    (app, "export", run.export),
    (app, "export-base", run.export_base),
    (app, "bench", bench.bench_command),
    (app, "curve", bench.curve_command),
    (app, "report", bench.report_command),
    (app, "demo", bench.demo),
    (app, "serve", serve.serve_cmd),
    (app, "privacy", privacy.privacy_cmd),
]
for group, verb, function in COMMANDS:
    group.command(verb)(guarded(function))
