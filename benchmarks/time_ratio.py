"""How much faster is assembling than training OPPU, measured side by side in one process?

A bench times OPPU and assembly in different phases, minutes apart; on a shared machine the speed
drifts in between (benchmarks/README.md). This script alternates the two for one target user, on
the same merged model and threads: OPPU training with the sharers' settings (the project's loss,
logits only where a label is predicted), the same training with the plain full forward
(`model(**batch).loss`, logits at every position, as before the change), and assembly with each
pool given. It trains nothing that is kept. Usage:

    python benchmarks/time_ratio.py BENCH_OUT [--variant NAME ...] [--user ID] [--rounds 2] [--no-oppu]

BENCH_OUT is a `perpcs bench` output folder; `--variant` adds a pool from BENCH_OUT/variants/NAME.
The timing itself is `perpcs.costs` (what `perpcs bench` reports for a few targets); this script adds
the full-forward loss and other pools.
"""

import argparse

from perpcs import training
from perpcs.costs import assembly_seconds, oppu_seconds
from perpcs.pipeline import Run


def full_forward_loss(model, batch):
    return model(**batch).loss


def main(out: str, variants: list[str], user_id: str | None, rounds: int, oppu: bool = True) -> None:
    run = Run(f"{out}/run")
    model, tok = run.merged
    uid = user_id or run.split["targets"][0]
    user = run.data.user(uid)
    settings = run.config.training("sharer_train", uid)
    pools = {"perpcs": run, **{v: Run(f"{out}/variants/{v}/run") for v in variants}}
    print(f"user {uid}: {len(user.history)} history items, "
          f"{sum(len(e.input_ids) for e in run.examples(user, tok))} tokens; "
          f"OPPU {settings.steps} steps of {settings.batch_size}")
    label_loss = training.lm_loss
    for r in range(rounds):
        times = {}
        for name, loss in (("oppu", label_loss), ("oppu, full-forward loss", full_forward_loss)) if oppu else ():
            training.lm_loss = loss  # the loss `train` calls
            try:
                model, times[name] = oppu_seconds(run, uid)
            finally:
                training.lm_loss = label_loss
            print(f"round {r}: {name}: {times[name]:.2f} s", flush=True)
        for name, source in pools.items():
            model, seconds = assembly_seconds(source, model, tok, uid)
            print(f"round {r}: assembly {name}: {seconds:.2f} s" + ("; OPPU / assembly " if times else "")
                  + ", ".join(f"{times[k] / seconds:.1f}x ({k})" for k in times), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--user", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-oppu", dest="oppu", action="store_false", help="time only the pools' assemblies")
    a = ap.parse_args()
    main(a.out, a.variant, a.user, a.rounds, a.oppu)
