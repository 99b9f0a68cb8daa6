"""Assembling a target user's PEFT from the pool (step 5) - one forward pass, no gradient.

At each piece position, in the order the forward pass reaches it, a forward pre-hook on the
module: scores every candidate piece by LN(h) . LN(g) / sqrt(d) averaged over the tokens that
predict the history's output tokens, per example, then over the batch (pools with activation keys
score differently, see `piece_scores`), keeps the top-k, weighs them by softmax(s / tau), mixes
them and installs the result in the module *before* it runs - so deeper positions are scored on
activations that already use the assembled shallower pieces. A pool with `task-activation` keys
(taken on the task model) installs nothing while it scores: the target is read by the task model too.
History is processed in batches (of similar lengths, to save padding); as in the reference, the
final PEFT is the plain average of the per-batch PEFTs, i.e. each sharer's weight at a position
averaged over batches. The result is a `Recipe`: for each position the chosen sharers and weights.
`assemble_users` and `assemble_history` do this for users of a run folder (the pipeline, Ray
workers, the server).
"""

from __future__ import annotations

import math
from itertools import accumulate
from typing import Sequence

import torch
import torch.nn.functional as F

from perpcs.annindex import LARGE_POOL, ApproximateIndex
from perpcs.data import Item
from perpcs.keyindex import KeyIndex
from perpcs.lora import clear, inference_config, install, lora_layers, mix_pieces
from perpcs.neighbours import NeighbourTable
from perpcs.recipe import Recipe
from perpcs.settings import AssemblySettings, KeyKind, RunConfig
from perpcs.strength import best_strength, holdout_size, strength_scores
from perpcs.tasks import Task
from perpcs.training import IGNORE, Example, collate, heldout_loss, history_examples


def predict_mask(labels: torch.Tensor) -> torch.Tensor:
    """True at the positions whose *next* token is a label token (they predict the output)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def example_means(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T, ...] over each example's masked tokens: [B', ...], examples with none left out."""
    m = mask.to(x.dtype).reshape(*mask.shape, *[1] * (x.dim() - 2))
    return ((x * m).sum(1) / m.sum(1).clamp(min=1))[mask.any(1)]


def piece_scores(h: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, key: KeyKind = "gate") -> torch.Tensor:
    """Score of each candidate piece [n] from module input h [B, T, d], piece keys [n, d], mask [B, T].

    Both kinds average over the masked tokens of each example, then over the examples that have any
    (LN: layer norm without learned affine):
    - key="gate" (the paper): s_j = mean_t LN(h_t) . LN(g_j) / sqrt(d);
    - key="activation" (not in the paper): the keys are the sharers' mean LN(h) and the user's is
      m = mean_t LN(h_t); both are centred on the candidates' mean key c and compared by direction,
      s_j = sqrt(d) * cos(m - c, k_j - c): a piece scores by how much this user's activations differ
      from the pool's in the way its owner's do. The sqrt(d) puts it on the gate score's scale
      (|LN(x)| is about sqrt(d), so that one is sqrt(d) times a cosine too), so tau means the same.
    """
    return mean_scores(target_mean(h, mask), keys, key)


def mean_scores(mean: torch.Tensor, keys: torch.Tensor, key: KeyKind = "gate") -> torch.Tensor:
    """`piece_scores` from the target's mean LN(h) [d] (both kinds read the activations only through it)."""
    d = mean.shape[-1]
    keys = keys.to(mean.device, mean.dtype)
    if key == "gate":  # linear in LN(h): averaging first gives the same scores for n x d work, not B x T x n x d
        # a row-wise sum, not a matrix product: a piece's score then does not depend on the other candidates
        return (F.layer_norm(keys, (d,)) * mean).sum(-1) / math.sqrt(d)
    c = keys.mean(0)
    return math.sqrt(d) * F.cosine_similarity((mean - c).unsqueeze(0), keys - c, dim=-1)


def target_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The target's mean LN(h) [d] over a batch: per example over its masked tokens, then over examples."""
    if not mask.any():
        raise ValueError("no token predicts an output token in this batch (are all targets truncated away?)")
    return example_means(F.layer_norm(h.float(), (h.shape[-1],)), mask).mean(0)


@torch.no_grad()
def activation_means(model, modules: dict[str, torch.nn.Module], examples: Sequence[Example], pad_id: int,
                     batch_size: int = 16, clip: float | None = None) -> dict[str, torch.Tensor]:
    """Mean LN(h) of each module's input over the tokens that predict outputs (per example, then
    over examples) while `model` runs over `examples`: a sharer's activation keys. With `clip`, each
    example's mean is first scaled down to L2 norm at most clip * sqrt(d) (for `dp.noisy_keys`)."""
    device = next(model.parameters()).device
    sums = {pos: 0.0 for pos in modules}
    n = 0

    def hook(pos, mask):
        def fn(module, args):
            v = example_means(F.layer_norm(args[0].float(), (args[0].shape[-1],)), mask)
            if clip is not None:
                v = v * (clip * math.sqrt(v.shape[-1]) / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1)
            sums[pos] = sums[pos] + v.sum(0)
        return fn

    for i in range(0, len(examples), batch_size):
        inputs = collate(examples[i : i + batch_size], pad_id, device)
        mask = predict_mask(inputs.pop("labels"))
        handles = [m.register_forward_pre_hook(hook(pos, mask)) for pos, m in modules.items()]
        try:
            model(**inputs)
        finally:
            for h in handles:
                h.remove()
        n += int(mask.any(1).sum())
    if n == 0:
        raise ValueError("no example has an output token to average over")
    return {pos: (v / n).cpu() for pos, v in sums.items()}


def choose(scores: torch.Tensor, settings: AssemblySettings,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) of the pieces to mix: top-k, sampled top-k, or nucleus (top-p)."""
    n = scores.numel()
    k = min(settings.top_k, n)
    if settings.select in ("topk", "whole"):
        idx = torch.topk(scores, k).indices
    elif settings.select == "sample":
        pool = torch.topk(scores, min(settings.sample_topk, n)).indices
        probs = torch.softmax(scores[pool] / settings.sample_temperature, 0)
        idx = pool[torch.multinomial(probs, min(k, pool.numel()), replacement=False, generator=generator)]
    else:  # topp: the smallest set of best pieces whose softmax mass reaches p
        probs = torch.softmax(scores / settings.temperature, 0)
        order = torch.argsort(probs, descending=True)
        cum = torch.cumsum(probs[order], 0)
        idx = order[: int((cum < settings.top_p).sum().item()) + 1]
    return idx, torch.softmax(scores[idx] / settings.temperature, 0)


class _Done(Exception):
    """Raised after the last position is assembled: the rest of the forward (and the LM head) is not needed."""


class Assembler:
    """Assembles recipes for target users from one pool on a merged (task-adapted) model.

    The model is wrapped in place with a working LoRA on the pool's positions, of rank r (linear) or r times
    the most pieces one position can take (cat: top-k per history batch, since the recipe averages the
    batches' picks; with strength "auto" all of a position's candidates); `unload()` gives it back. History
    examples are formatted with `max_len` and `retrieval_copies` (a run's: `for_run`); `seed` seeds "sample".
    """

    def __init__(self, model, pool, settings: AssemblySettings, max_len: int = 256, retrieval_copies: bool = False,
                 seed: int = 0, neighbours: NeighbourTable | None = None):
        from peft import get_peft_model

        self.pool, self.settings, self.neighbours = pool, settings, neighbours
        self.max_len, self.retrieval_copies, self.seed = max_len, retrieval_copies, seed
        candidates = max(len(pool.candidates(p)) for p in pool.positions)
        # a recipe averages its history batches' picks, so it can name top_k sharers per batch at a position
        batches = -(-settings.recent_k * (2 if retrieval_copies else 1) // settings.batch_size)
        most = (candidates if settings.select in ("topp", "all") or settings.strength == "auto" else
                min(candidates, settings.top_k * (batches if settings.select in ("topk", "sample") else 1)))
        rank = int(pool.lora_config["r"]) * (1 if settings.mix == "linear" else most)
        self.model = get_peft_model(model, inference_config(pool.lora_config, rank)).eval()
        self.layers = lora_layers(self.model)
        missing = set(pool.positions) - set(self.layers)
        if missing:
            raise ValueError(f"the model has no module at pool positions {sorted(missing)[:5]}: "
                             "pool from another architecture?")
        # read per position as the forward pass reaches it; topp and whole score every candidate
        every_candidate = settings.select in ("topp", "whole")
        auto = settings.key_index == "auto" and len(pool) >= LARGE_POOL and not every_candidate
        self.approximate = settings.key_index == "approximate" or auto
        if self.approximate and every_candidate:
            raise ValueError(f"select={settings.select!r} scores every candidate: it needs key_index='exact' "
                             "(or 'auto')")
        self.keys = ApproximateIndex.of(pool, settings.nprobe) if self.approximate else KeyIndex.of(pool)

    @classmethod
    def for_run(cls, model, pool, config: RunConfig, settings: AssemblySettings | None = None,
                neighbours: NeighbourTable | None = None) -> "Assembler":
        """An assembler with a run's assembly settings (or `settings`) and its history format and seed."""
        return cls(model, pool, settings or config.assembly, config.max_len, config.retrieval_copies, config.seed,
                   neighbours)

    def unload(self):
        """The merged model without the working LoRA."""
        return self.model.unload()

    def examples(self, task: Task, tokenizer, history: Sequence[Item], profile: str | None = None) -> list[Example]:
        s = self.settings
        items = list(history)[-s.recent_k:]
        if s.budget_tokens is not None:
            newest_first = [len(e.input_ids) for e in history_examples(task, tokenizer, items[::-1], self.max_len)]
            kept = max(1, sum(total <= s.budget_tokens for total in accumulate(newest_first)))
            items = items[len(items) - kept:]
        return history_examples(task, tokenizer, items, self.max_len, self.retrieval_copies, profile)

    @torch.no_grad()
    def assemble(self, examples: Sequence[Example], pad_id: int,
                 trace: list | None = None) -> dict[str, dict[str, float]]:
        """{position: {sharer: weight}} averaged over history batches. `trace` collects per-batch scores."""
        s = self.settings
        if not examples:
            raise ValueError("cannot assemble from an empty history")
        device = next(self.model.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)
        # Batches of similar length waste less compute on padding; scores are per-example means, so
        # only which examples share a batch changes, not what any example contributes.
        ordered = sorted(examples, key=lambda e: len(e.input_ids))
        batches = [ordered[i : i + s.batch_size] for i in range(0, len(ordered), s.batch_size)]
        totals: dict[str, dict[str, float]] = {pos: {} for pos in self.pool.positions}
        for batch in batches:
            inputs = collate(batch, pad_id, device)
            mask = predict_mask(inputs.pop("labels"))
            batch_trace: dict = {}
            handles = [self.layers[pos].register_forward_pre_hook(self._hook(pos, mask, generator, totals, batch_trace))
                       for pos in self.pool.positions]
            try:
                self.model(**inputs)
            except _Done:
                pass
            finally:
                for h in handles:
                    h.remove()
            if trace is not None:
                trace.append(batch_trace)
        return {pos: {sid: w / len(batches) for sid, w in sorted(ws.items())} for pos, ws in totals.items()}

    @torch.no_grad()
    def assemble_whole(self, examples: Sequence[Example], pad_id: int,
                       trace: list | None = None) -> dict[str, dict[str, float]]:
        """select="whole": whole sharers, not pieces. One forward with nothing installed reads the target's mean
        LN(h) at every position (over all of `examples`, not per batch); each sharer's score is the mean of its
        pieces' scores, and the top-k sharers (softmax(score / tau)) each give every piece they share. Summed
        over positions the keys find a sharer like the target far more often than any one position does
        (benchmarks/README.md), and picking a sharer once keeps the first layers' pick from deciding the
        deeper ones. With `task-activation` keys the target is read on the model the keys were taken on."""
        positions = self.pool.positions
        means = self.bare_means(examples, pad_id)
        scored = {}
        for pos in positions:
            ids, keys = self.keys.keys(pos)
            scored[pos] = (list(ids), mean_scores(means[pos], keys, self.pool.key).cpu() if ids else torch.empty(0))
        if trace is not None:
            trace.append(scored)
        per_sharer: dict[str, list[float]] = {}
        for ids, scores in scored.values():
            for sid, x in zip(ids, scores.tolist()):
                per_sharer.setdefault(sid, []).append(x)
        sharers = sorted(per_sharer)
        if not sharers:  # no position has a piece
            return {pos: {} for pos in positions}
        idx, w = choose(torch.tensor([sum(per_sharer[s]) / len(per_sharer[s]) for s in sharers]), self.settings,
                        torch.Generator().manual_seed(self.seed))
        chosen = {sharers[i]: wi for i, wi in zip(idx.tolist(), w.tolist())}
        weights = {}
        for pos, (ids, _) in scored.items():  # where a chosen sharer has no piece, the others' weights sum to 1
            here = {sid: chosen[sid] for sid in sorted(ids) if sid in chosen}
            weights[pos] = {sid: x / sum(here.values()) for sid, x in here.items()}
        return weights

    @torch.no_grad()
    def bare_means(self, examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
        """{position: mean LN(h) over the tokens that predict outputs}, read in one forward with nothing installed
        (over all of `examples`, not per batch): a user's key on the task model."""
        if not examples:
            raise ValueError("cannot assemble from an empty history")
        for pos in self.pool.positions:
            clear(self.layers[pos])
        return activation_means(self.model, {p: self.layers[p] for p in self.pool.positions}, examples, pad_id,
                                self.settings.batch_size)

    def whole(self, sharer: str) -> dict[str, dict[str, float]]:
        """{position: {sharer: 1.0}} wherever `sharer` shares a piece: its whole LoRA as a recipe's weights."""
        shared = set(self.pool.positions_of(sharer))
        return {pos: ({sharer: 1.0} if pos in shared else {}) for pos in self.pool.positions}

    def assemble_neighbours(self, examples: Sequence[Example], pad_id: int,
                            user: str | None = None) -> dict[str, dict[str, float]]:
        """select="neighbours": the target's key as `assemble_whole` reads it; the neighbour table names the top-k
        sharers that did best for its nearest validation users, each installed whole with equal weight (the
        table's scores are in the metric's units, which set no softmax scale). `user` (a validation user scored in
        calibration) is not its own neighbour."""
        if self.neighbours is None:
            raise ValueError("select='neighbours' needs the pool's neighbour table (perpcs.neighbours)")
        chosen = self.neighbours.pick(self.bare_means(examples, pad_id), self.settings.neighbours, exclude=user,
                                      top=self.settings.top_k)
        absent = sorted(set(chosen) - set(self.pool.sharers()))
        if absent:
            raise ValueError(f"the neighbour table names sharer {absent[0]}, who is not in this pool")
        weights = {pos: {} for pos in self.pool.positions}
        for sid in chosen:
            for pos, w in self.whole(sid).items():
                weights[pos].update(w)
        # where a chosen sharer has no piece, the others share the position
        return {pos: {sid: 1.0 / len(w) for sid in sorted(w)} for pos, w in weights.items()}

    def _scores(self, pos: str, h: torch.Tensor, mask: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """(candidates, their scores) at `pos`: every candidate, or the best the approximate index finds."""
        s = self.settings
        if self.approximate:
            want = max(s.top_k, s.sample_topk if s.select == "sample" else 0)
            return self.keys.search(pos, target_mean(h, mask), want)
        ids, keys = self.keys.keys(pos)
        # on the CPU: the seeded generator is a CPU one (multinomial refuses it for CUDA scores)
        return ids, (piece_scores(h, keys, mask, self.pool.key).cpu() if ids else torch.empty(0))

    def _hook(self, pos, mask, generator, totals, batch_trace):
        def hook(module, args):
            ids, scores = self._scores(pos, args[0], mask)
            if not ids:  # no sharer shares this position (low sharing ratio): leave it without update
                clear(module)
                batch_trace[pos] = ([], torch.empty(0))
            else:
                idx, w = choose(scores, self.settings, generator)
                chosen = [ids[i] for i in idx.tolist()]
                if self.pool.key == "task-activation":  # the keys are the task model's: so are deeper activations
                    clear(module)
                else:
                    install(module, mix_pieces([self.pool.piece(c, pos) for c in chosen], w.tolist(),
                                               self.settings.mix, module.lora_A["default"].weight.shape[0]))
                for c, wi in zip(chosen, w.tolist()):
                    totals[pos][c] = totals[pos].get(c, 0.0) + wi
                batch_trace[pos] = (list(ids), scores)
            if len(batch_trace) == len(self.pool.positions):
                raise _Done
        return hook

    @torch.no_grad()
    def install_weights(self, weights: dict[str, dict[str, float]], strength: float) -> None:
        """Put the update of {position: {sharer: weight}}, scaled by `strength`, into the working LoRA."""
        for pos, chosen in weights.items():
            layer = self.layers[pos]
            if not chosen:
                clear(layer)
                continue
            A, B = mix_pieces([self.pool.piece(sid, pos) for sid in chosen], list(chosen.values()), self.settings.mix,
                              layer.lora_A["default"].weight.shape[0])
            install(layer, (A, strength * B))

    @torch.no_grad()
    def pick_by_loss(self, weights: dict[str, dict[str, float]], examples: Sequence[Example], pad_id: int,
                     n: int | None = None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """Of the n (default `pick_by_loss`) sharers with the most weight summed over positions (ties by id), the
        one whose whole update (every piece it shares, weight 1) gives `examples` the lowest mean output loss;
        returns its weights and each tried sharer's loss. Keys score pieces by how the history's activations
        look; this scores what the target cares about, the history's own outputs, still without a gradient."""
        if not examples:
            raise ValueError("cannot pick by loss on an empty history")
        totals: dict[str, float] = {}
        for chosen in weights.values():
            for sid, w in chosen.items():
                totals[sid] = totals.get(sid, 0.0) + w
        tried = sorted(totals, key=lambda sid: (-totals[sid], sid))[: n or self.settings.pick_by_loss]
        if not tried:  # no position has a piece: nothing to pick from
            return weights, {}
        wholes, losses = {}, {}
        for sid in tried:
            wholes[sid] = self.whole(sid)
            self.install_weights(wholes[sid], 1.0)
            losses[sid] = heldout_loss(self.model, examples, pad_id, self.settings.batch_size)
        best = min(tried, key=lambda sid: (losses[sid], tried.index(sid)))
        return wholes[best], losses

    def recorded_settings(self) -> dict:
        """What a recipe records of how it was made: the assembly settings and the history format."""
        return {**self.settings.model_dump(), "retrieval_copies": self.retrieval_copies, "max_len": self.max_len,
                "seed": self.seed}

    def recipe(self, task: Task, tokenizer, history: Sequence[Item], profile: str | None = None,
               user: str | None = None, trace: list | None = None) -> Recipe:
        """The target user's recipe from their own history (only its newest items within the budget); with
        strength "auto", from all but the newest few, on which the strength is then chosen."""
        s, history = self.settings, list(history)
        v = holdout_size(len(history), s.holdout_items) if s.strength == "auto" else 0
        examples = (self.examples(task, tokenizer, history[: len(history) - v], profile)
                    if s.select not in ("none", "all") or s.pick_by_loss else [])
        if s.select == "none":  # neither rule scores pieces: no forward
            weights = {p: {} for p in self.pool.positions}
        elif s.select == "all":
            weights = {p: {sid: 1.0 / len(c) for sid in c} for p in self.pool.positions
                       for c in [self.pool.candidates(p)]}
        elif s.select == "whole":
            weights = self.assemble_whole(examples, tokenizer.pad_token_id, trace)
        elif s.select == "neighbours":
            weights = self.assemble_neighbours(examples, tokenizer.pad_token_id, user)
        else:
            weights = self.assemble(examples, tokenizer.pad_token_id, trace)
        losses = None
        if s.pick_by_loss:
            weights, losses = self.pick_by_loss(weights, examples, tokenizer.pad_token_id)
        strength, scores = (1.0 if s.strength == "auto" else s.strength), None
        if v:
            by_metric = s.strength_by == "metric" or (s.strength_by == "kind" and task.kind == "generation")
            scores = strength_scores(self.model, lambda a: self.install_weights(weights, a), task, tokenizer,
                                     history[-v:], s.strengths, by_metric, self.max_len)
            strength = best_strength(scores)
        return Recipe(pool_id=self.pool.pool_id, base_fingerprint=self.pool.base_fingerprint,
                      lora=self.pool.lora_config, mix=s.mix, top_k=s.top_k, user=user,
                      settings=self.recorded_settings(),
                      strength=strength, strength_scores=scores, pick_losses=losses,
                      pieces={p: [(sid, round(w, 7)) for sid, w in ws.items()] for p, ws in weights.items()})
