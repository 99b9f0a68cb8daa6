"""Probe: how fast does one user's LoRA learn that user's rule? (evidence for docs/hyperparameters.md)

Trains a LoRA on one synthetic user's history from a run's task-adapted model, for each
(lr, steps, batch) given, and measures accuracy on held-out queries of other users of the same
latent group (they follow the same tag rule). Usage:

    python benchmarks/lr_probe.py DATA RUN USER lr,steps,batch [lr,steps,batch ...]
"""

import json
import sys
from pathlib import Path

from perpcs.data import load_dataset
from perpcs.generation import generate
from perpcs.models import load_base
from perpcs.settings import LoraSettings, TrainSettings
from perpcs.training import history_examples, train_lora


def main(data: str, run: str, uid: str, *configs: str) -> None:
    ds = load_dataset(data)
    groups = json.loads((Path(data) / "groups.json").read_text())
    model, tok = load_base(Path(run) / "task" / "merged")
    task, user = ds.task, ds.user(uid)
    evalq = [q for u in ds.users if groups[u.user_id] == groups[uid] and u.user_id != uid for q in u.queries][:32]

    def accuracy(m) -> float:
        texts = generate(m, tok, [task.format_prompt(q.input) for q in evalq], task.new_tokens)
        return sum(task.parse_output(t) == q.output for t, q in zip(texts, evalq)) / len(evalq)

    print(f"no LoRA: accuracy {accuracy(model):.3f} on {len(evalq)} queries", flush=True)
    examples = history_examples(task, tok, user.history)
    for spec in configs:
        lr, steps, batch = spec.split(",")
        settings = TrainSettings(lr=float(lr), steps=int(steps), batch_size=int(batch))
        peft_model, stats = train_lora(model, examples, LoraSettings(), settings, tok.pad_token_id)
        print(f"lr {lr} steps {steps} batch {batch}: final loss {stats['final_loss']:.3f}, "
              f"{stats['seconds']:.0f} s, accuracy {accuracy(peft_model):.3f}", flush=True)
        peft_model.unload()


if __name__ == "__main__":
    main(*sys.argv[1:])
