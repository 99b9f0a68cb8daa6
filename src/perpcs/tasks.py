"""Tasks: what an item looks like in a prompt, and how a generated answer is read back.

A task has a `kind`: `classification` (answer must be one of `labels`), `rating` (a number in
`scale`) or `generation` (free text). Presets reproduce the six LaMP tasks Per-Pcs uses.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Literal, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

Kind = Literal["classification", "rating", "generation"]
log = logging.getLogger(__name__)
CUT_SHORT_WARN = 0.05  # share of generated answers at the token budget above which a run warns
MAX_NEW_TOKENS = 4096  # the largest generation budget a task may ask for


class Shown(Protocol):
    """What a prompt shows of an earlier item (a `data.Item` is one); data.py imports this module, not back."""

    input: str
    output: str


class Task(BaseModel):
    """The content of `task.json`."""

    model_config = ConfigDict(extra="forbid")
    name: str
    kind: Kind
    instruction: str
    input_name: str = "Input"
    output_name: str = "Output"
    labels: list[str] | None = None
    scale: tuple[float, float] | None = None
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)

    @model_validator(mode="after")
    def _kind_fields(self) -> "Task":
        if self.kind == "classification" and not self.labels:
            raise ValueError("a classification task needs 'labels'")
        for label in self.labels or []:  # a generated answer is read as its stripped first line (parse_output)
            if not label.strip() or label != label.strip() or "\n" in label or "\r" in label:
                raise ValueError(f"label {label!r}: a label is one line of text without leading or trailing spaces "
                                 f"(a generated answer can never be anything else), got labels {self.labels}")
        if self.labels is not None and len(set(self.labels)) < len(self.labels):
            twice = sorted({label for label in self.labels if self.labels.count(label) > 1})
            raise ValueError(f"labels {twice} are listed twice; each label once")
        if self.kind == "rating":
            if self.scale is None:
                raise ValueError("a rating task needs 'scale' [min, max]")
            if not all(math.isfinite(x) for x in self.scale) or self.scale[0] >= self.scale[1]:
                raise ValueError(f"'scale' must be [min, max] with min < max, got {list(self.scale)}")
        return self

    @property
    def new_tokens(self) -> int:
        """Generation budget: the task's, else a default by kind."""
        if self.max_new_tokens:
            return self.max_new_tokens
        return {"classification": 8, "rating": 4, "generation": 32}[self.kind]

    def output_problem(self, output: str) -> str | None:
        if self.kind == "classification" and output.strip() not in self.labels:
            return f"{output!r} is not one of the task's labels {self.labels}"
        if self.kind == "rating":
            value = float(output) if _NUMBER.fullmatch(output.strip()) else None  # not the first number of "5/10"
            if value is None or not (self.scale[0] <= value <= self.scale[1]):
                return f"{output!r} is not a number in the scale {list(self.scale)}"
        return None

    def format_prompt(self, input: str, retrieved: Sequence[Shown] = (), profile: str | None = None) -> str:
        """The prompt for one item, ending where the model must write the output.

        Plain text (no chat template) so that any causal LM works; `retrieved` are the user's own
        earlier items (BM25), `profile` a free-text user profile.
        """
        lines = [self.instruction.strip()]
        if self.kind == "classification":
            lines.append("Options: " + ", ".join(self.labels))
        if self.kind == "rating":
            lines.append(f"Answer with a number from {fmt_num(self.scale[0])} to {fmt_num(self.scale[1])}.")
        if profile:
            lines.append(f"About this user: {profile.strip()}")
        for it in retrieved:
            lines.append(f"Earlier, this user saw {self.input_name}: {it.input.strip()}")
            lines.append(f"and answered {self.output_name}: {it.output.strip()}")
        lines.append(f"{self.input_name}: {input.strip()}")
        lines.append(f"{self.output_name}:")
        return "\n".join(lines)

    @staticmethod
    def format_target(output: str) -> str:
        """The text the model learns to write after the prompt (a space, then the output)."""
        return " " + output.strip()

    def parse_output(self, text: str) -> str:
        """Read a generation back: the first line, stripped; ratings reduced to the number."""
        first = text.strip().split("\n", 1)[0].strip() if text.strip() else ""
        if self.kind == "rating":
            value = parse_number(first)
            return fmt_num(value) if value is not None else first
        return first


def answer_budget(task: Task, tokenizer) -> int:
    """Tokens to generate per answer: the task's budget, raised for a classification task to fit its
    longest label (with a notice), since a label cut short is never one of the labels."""
    budget = task.new_tokens
    if task.kind == "classification":
        longest = max(len(tokenizer(task.format_target(label), add_special_tokens=False)["input_ids"])
                      for label in task.labels)
        if longest > budget:
            log.warning("task %s: max_new_tokens=%d is shorter than its longest label (%d tokens); generating "
                        "%d tokens so that no label is cut off", task.name, budget, longest, longest)
            budget = longest
    return budget


def cut_short(task: Task, texts: Sequence[str], tokenizer, budget: int) -> float:
    """The share of generated answers that reached the token budget (so were likely cut off); above
    CUT_SHORT_WARN a generation task logs a warning, as its scores then measure the budget."""
    share = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) >= budget for t in texts) / max(1, len(texts))
    if task.kind == "generation" and share > CUT_SHORT_WARN:
        log.warning("task %s: %.0f%% of answers reached max_new_tokens=%d and may be cut off; raise "
                    "max_new_tokens in task.json", task.name, 100 * share, budget)
    return share


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_number(text: str) -> float | None:
    """The first number in `text`, or None when there is none."""
    m = _NUMBER.search(str(text))
    return float(m.group()) if m else None


def fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


LAMP2_TAGS = [
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
]

PRESETS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(name="LaMP-1", kind="classification", labels=["[1]", "[2]"],
             instruction="For an author who has written the paper, which reference is related? "
                         "Answer [1] or [2].",
             input_name="Paper", output_name="Reference", max_new_tokens=4),
        Task(name="LaMP-2", kind="classification", labels=LAMP2_TAGS,
             instruction="Which tag does this movie relate to? Answer with the tag only.",
             input_name="Movie", output_name="Tag", max_new_tokens=8),
        Task(name="LaMP-3", kind="rating", scale=(1, 5),
             instruction="What is the score of this review, from 1 to 5? Answer with the number only.",
             input_name="Review", output_name="Score", max_new_tokens=3),
        Task(name="LaMP-4", kind="generation",
             instruction="Generate a headline for this article.",
             input_name="Article", output_name="Headline", max_new_tokens=32),
        Task(name="LaMP-5", kind="generation",
             instruction="Generate a title for this paper abstract.",
             input_name="Abstract", output_name="Title", max_new_tokens=32),
        Task(name="LaMP-7", kind="generation",
             instruction="Paraphrase this tweet in the user's own style.",
             input_name="Tweet", output_name="Paraphrase", max_new_tokens=48),
    ]
}


def _norm(name: str) -> str:
    """LaMP's own spellings (LaMP_2, LaMP-2M, lamp2) name the same preset."""
    n = re.sub(r"[^a-z0-9]", "", name.lower())
    return n[:-1] if re.fullmatch(r"lamp\dm", n) else n


def get_task(name: str) -> Task:
    """A preset by name (`LaMP-1` .. `LaMP-7`, also `LaMP_3`, `lamp3`); unknown names list the known."""
    for k, t in PRESETS.items():
        if _norm(k) == _norm(name):
            return t
    raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(PRESETS)}")
