"""Probe (not the paper's method): does scoring on deviations from a population mean fix piece selection?

For a finished `perpcs bench` run: computes the mean LN(h) of the base users' histories at every
piece position (`activation_means`), re-assembles every target with `piece_scores(center=...)`, and
scores the result like the bench's `perpcs` method, next to the plain recipes. Usage:

    python benchmarks/centered_probe.py BENCH_OUT
"""

import json
import sys
from pathlib import Path

from perpcs.assembly import Assembler, activation_means
from perpcs.baselines import generate, prompts
from perpcs.bench import group_diagnostics
from perpcs.evaluation import score
from perpcs.pipeline import Run
from perpcs.recipe import apply_recipe


def main(out: str) -> None:
    run = Run(Path(out) / "run")
    model, tok = run.merged
    task, pool = run.data.task, run.open_pool()
    base_examples = [e for u in run.users(run.split["base"]) for e in run.examples(u, tok)]
    center = activation_means(model, base_examples, pool.positions, tok.pad_token_id)
    targets = run.users(run.split["targets"])
    golds = {q.id: q.output for u in targets for q in u.queries}
    groups_file = Path(run.config.data) / "groups.json"
    for name, reference in (("plain", None), ("centered", center)):
        assembler = Assembler(model, pool, run.config.assembly, reference)
        recipes = {u.user_id: assembler.recipe(task, tok, u.history, u.profile, user=u.user_id) for u in targets}
        assembler.unload()
        preds = {}
        for u in targets:
            peft_model = apply_recipe(model, recipes[u.user_id], pool)
            texts = generate(peft_model, tok, prompts(task, u), task.new_tokens)
            preds.update({q.id: task.parse_output(t) for q, t in zip(u.queries, texts)})
            peft_model.unload()
        line = {"scoring": name, **score(task, golds, preds)}
        if groups_file.exists():
            d = group_diagnostics(run, json.loads(groups_file.read_text()), recipes)
            line.update(same_group_weight=round(d["same_group_weight"], 3), chance=round(d["same_group_chance"], 3))
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
