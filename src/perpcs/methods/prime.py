"""prime: PriME-style merging (`perpcs.prime`), CMA-ES weights over the nearest sharers' whole LoRAs
searched on the target's newest history items; the weights found are written to OUT/prime/."""

import json
import time

from perpcs.lora import load_lora
from perpcs.methods import Method, Personalized, register
from perpcs.prime import merge
from perpcs.runfolder import safe_name
from perpcs.training import history_examples
from perpcs.utils import derived_seed, write_json


@register
class Prime(Method):
    name = "prime"
    needs = frozenset({"pool", "sharer_embeddings"})

    def personalize(self, user) -> Personalized:
        ctx, run, s = self.ctx, self.ctx.run, self.ctx.settings.prime
        t0 = time.perf_counter()
        chosen = ctx.nearest_sharers(user, min(s.m, len(ctx.sharers)))
        examples = history_examples(run.data.task, ctx.tok, user.history[-s.items:], run.config.max_len)
        loras = [load_lora(run.sharer_dir(u) / "adapter") for u in chosen]
        seed = derived_seed(run.config.seed, "prime", user.user_id)
        peft_model, weights, losses = merge(ctx.model, run.config.lora.model_dump(), loras, examples,
                                            ctx.tok.pad_token_id, s, seed)
        seconds = time.perf_counter() - t0
        mix = {ctx.pool.pseudonym(u): round(float(w), 7) for u, w in zip(chosen, weights)}
        write_json(ctx.out / "prime" / f"{safe_name(user.user_id)}.json", {"weights": mix, "losses": losses})
        return Personalized(peft_model, seconds, len(json.dumps(mix)))
