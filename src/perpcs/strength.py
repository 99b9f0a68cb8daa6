"""How much of the assembled update a target user gets: the strength alpha (not in the paper).

A recipe's update is alpha * sum_j w_j B_j A_j; alpha = 0 is the non-personalized model. Other
users' pieces at full strength can hurt a target (benchmarks/README.md), so with
`assembly.strength="auto"` the target's newest few
history items are held out of assembly and each candidate alpha is scored on them, still without
training: by the loss of their outputs for classification and rating, and by the task's own metric
on greedy generations for generation (there a lower loss did not mean better text). Ties go to the
smaller alpha. Cost: one LoRA install and a forward (or a short generation) over those items per
candidate, on top of the assembly.
"""

from __future__ import annotations

from typing import Callable, Sequence

from perpcs.data import Item
from perpcs.evaluation import primary_metric, score
from perpcs.generation import generate
from perpcs.tasks import Task
from perpcs.training import heldout_loss, history_examples


def holdout_size(n_items: int, holdout_items: int) -> int:
    """Items held out of assembly to choose alpha on: a fifth of the history, at most `holdout_items`
    (none under 5 items: the documented fallback is the strength the recipe would have without a choice)."""
    return min(holdout_items, n_items // 5)


def strength_scores(model, install: Callable[[float], None], task: Task, tokenizer, heldout: Sequence[Item],
                    candidates: Sequence[float], by_metric: bool, max_len: int = 256) -> dict[float, float]:
    """{alpha: score, higher is better} on the held-out items - the task's primary metric on greedy
    outputs (`by_metric`) or minus the outputs' mean loss - with `install(alpha)` putting the
    alpha-scaled update into `model` before each candidate is scored."""
    scores = {}
    for alpha in candidates:
        install(alpha)
        if by_metric:
            texts = generate(model, tokenizer, [task.format_prompt(it.input) for it in heldout], task.new_tokens)
            golds = {str(i): it.output for i, it in enumerate(heldout)}
            preds = {str(i): task.parse_output(t) for i, t in enumerate(texts)}
            name, higher = primary_metric(task)
            value = score(task, golds, preds)[name]
            scores[alpha] = value if higher else -value
        else:
            examples = history_examples(task, tokenizer, heldout, max_len)
            scores[alpha] = -heldout_loss(model, examples, tokenizer.pad_token_id)
    return scores


def best_strength(scores: dict[float, float]) -> float:
    """The best-scoring alpha; ties go to the smaller one (less of other users' update)."""
    return min(scores, key=lambda a: (-scores[a], a))
