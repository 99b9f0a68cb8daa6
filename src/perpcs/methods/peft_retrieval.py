"""peft_retrieval: the whole LoRA of the sharer(s) whose mean history embedding is closest to the
target's (`retrieval_m` of them, averaged); it stores only their pseudonyms."""

import json
import time

from perpcs.lora import apply_lora, average_loras, load_lora
from perpcs.methods import Method, Personalized, register


@register
class PeftRetrieval(Method):
    name = "peft_retrieval"
    rag_row = "peft_retrieval+rag"
    needs = frozenset({"pool", "sharer_embeddings"})

    def personalize(self, user) -> Personalized:
        ctx, lora = self.ctx, self.ctx.run.config.lora
        t0 = time.perf_counter()
        chosen = ctx.nearest_sharers(user, ctx.settings.retrieval_m)
        weights = average_loras([load_lora(ctx.run.sharer_dir(u) / "adapter") for u in chosen])
        seconds = time.perf_counter() - t0
        peft_model = apply_lora(ctx.model, lora.model_dump(), lora.r, weights)
        return Personalized(peft_model, seconds, len(json.dumps([ctx.pool.pseudonym(u) for u in chosen])))
