"""Every setting of perpcs, once: a run's (steps 0-5), the bench's and the presets.

A run's settings are `RunConfig`, saved as RUN/run.json; `overrides.build_config` layers defaults <
a JSON file < flags < `--set` overrides. Every number carries its constraint here (finite, a range,
an enum), so a bad value is refused before any step runs (docs/validation.md).
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from perpcs.rules import GRID, PAPER_RULE, RULES, with_rule_fixed
from perpcs.utils import deep_merge, derived_seed

# What a piece's key is: its gate trained with the sharer's LoRA frozen (the paper), or the
# sharer's mean activation at the piece's position over its own history, with its LoRA on or off.
KeyKind = Literal["gate", "activation", "task-activation"]
# Keys that are a sharer's mean activation (what `key_noise` can make DP): with its LoRA on, or on the task model.
MEAN_KEYS = ("activation", "task-activation")
# Upper bounds of the counts and budgets: far above any use, low enough that a typo (1e9 steps) is refused.
MANY = 1_000_000
MAX_STRENGTH = 10.0  # the largest alpha an assembled update may be scaled by (settings and recipes)
SEEDS = 2**32  # seeds are 32-bit: numpy's limit
# "auto", "cpu", "cuda" or "cuda:N", "mps"
DEVICE = r"^(auto|cpu|mps|cuda(:\d+)?)$"


class Settings(BaseModel):
    """Settings refuse unknown fields, and true/false where a number is expected (pydantic reads True as 1)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        kind = cls.model_fields[info.field_name].annotation
        items = value if isinstance(value, list) and get_origin(kind) is list else [value]
        if kind is not bool and any(isinstance(v, bool) for v in items):
            raise ValueError(f"expected a number, got {json.dumps(value)}")
        return value


def _positive(default: float, description: str, most: float = MANY, **more) -> Any:
    """A finite float > 0 and <= `most`."""
    return Field(default, gt=0, le=most, allow_inf_nan=False, description=description, **more)


def _count(default: int | None, description: str, least: int = 1, most: int = MANY) -> Any:
    """An int in [least, most]."""
    return Field(default, ge=least, le=most, description=description)


class LoraSettings(Settings):
    """The LoRA shape. Pieces are only exchangeable between PEFTs of the same settings."""

    r: int = _count(8, "LoRA rank of every sharer, OPPU and the task LoRA", most=1024)
    alpha: float = _positive(16.0, "LoRA alpha: the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA branch while training")
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
                                      description="module names LoRA wraps in every layer (one piece each)")

    @field_validator("target_modules")
    @classmethod
    def _distinct_names(cls, names: list[str]) -> list[str]:
        if len(set(names)) < len(names) or not all(n.strip() for n in names):
            raise ValueError(f"expected distinct, non-empty module names, got {names}")
        return names


class TrainSettings(Settings):
    """One training run: optimiser and budget. `steps` wins over `epochs` when both are given.

    A per-user budget (sharers, OPPU) is `epochs` capped at `max_steps`, so a 3-item history is not
    trained for 30 steps and a 500-item one gets its epoch; with `val_fraction` > 0 the newest items
    (that fraction, at most `val_items`; none while it rounds to 0) are held out, their loss is
    measured after each epoch, training stops after `patience` epochs without improvement, and the
    best epoch's weights are kept.
    """

    lr: float = _positive(1e-3, "AdamW learning rate", most=10)
    steps: int | None = _count(None, "optimiser steps; None: `epochs` (capped at `max_steps`)")
    epochs: float = _positive(1.0, "passes over the examples when `steps` is None", most=1000)
    max_steps: int | None = _count(None, "cap on the steps `epochs` gives")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="share of the newest items held out to stop on")
    val_items: int = _count(8, "at most this many held-out items")
    patience: int = _count(1, "epochs without a better held-out loss before stopping")
    batch_size: int = _count(4, "examples per step", most=65536)
    grad_clip: float = Field(1.0, ge=0, le=MANY, allow_inf_nan=False, description="gradient norm clip (0: none)")
    weight_decay: float = Field(0.0, ge=0, le=10, allow_inf_nan=False, description="AdamW weight decay")
    seed: int = Field(0, ge=0, lt=SEEDS, description="initialisation, batch order and dropout (set per user by "
                      "`RunConfig.training`)")
    dp_noise: float = Field(0.0, ge=0, le=MANY, allow_inf_nan=False, description="DP-SGD (opacus, docs/privacy.md): "
                            "noise std over dp_clip, Poisson-sampled steps of expected size batch_size (grad_clip "
                            "unused); 0: plain AdamW. For sharer_train: each sharer's LoRA (epsilon, dp_delta)-DP")
    dp_clip: float = Field(1.0, gt=0, le=MANY, allow_inf_nan=False,
                           description="dp_noise: each example's gradient norm bound")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="dp_noise: the delta of the (epsilon, delta) guarantee")

    @model_validator(mode="before")
    @classmethod
    def _drop_unread_max_len(cls, data: Any) -> Any:
        """Run folders of older perpcs saved a `max_len` here that nothing read; the run's `max_len` is the one."""
        if isinstance(data, dict) and "max_len" in data:
            data = {k: v for k, v in data.items() if k != "max_len"}
        return data


class AssemblySettings(Settings):
    """Step 5. Reference defaults: top-k 3, tau 1, batches of 16; the history budget is
    `recent_k` items (the reference reads up to 2000; why fewer: benchmarks/README.md). History
    examples are formatted with the run's `max_len` and `retrieval_copies`, as in training."""

    top_k: int = _count(3, "pieces mixed at each position", most=10_000)
    temperature: float = _positive(1.0, "tau of the softmax(s / tau) mixing weights")
    recent_k: int = _count(16, "history budget in items, newest first")
    budget_tokens: int | None = _count(None, "and in tokens: the newest items whose examples fit (at least one item)",
                                       most=10**9)
    batch_size: int = _count(16, "history examples per forward", most=65536)
    select: Literal["topk", "sample", "topp", "whole", "neighbours", "all", "none"] = Field(
        "topk", description="top-k, sampled top-k, or nucleus, per position; whole: the top-k sharers by their "
        "pieces' mean score, each with every piece it shares (one forward, nothing installed while it reads); "
        "neighbours: the top-k sharers, whole and with equal weights, that did best for the target's `neighbours` "
        "nearest validation users (the same one forward; perpcs.neighbours, not in the paper); all: "
        "every candidate, equal weights (the same for every target); none: no piece (the task model); neither of "
        "the last two reads the history")
    neighbours: int = _count(5, "select=neighbours: how many of the nearest validation users name the sharers",
                             most=10_000)
    sample_topk: int = _count(10, "select=sample: draw from this many best pieces", most=10_000)
    sample_temperature: float = _positive(1.0, "select=sample: temperature of the draw")
    top_p: float = _positive(0.9, "select=topp: softmax mass of the pieces kept", most=1)
    mix: Literal["linear", "cat"] = Field("linear", description="linear: A and B mixed separately (the paper); "
                                          "cat: the exact sum of w_j B_j A_j")
    strength: float | Literal["auto"] = Field(1.0, description="alpha scaling the assembled update (0 to "
                                              "MAX_STRENGTH), or auto: chosen per target among `strengths` on its "
                                              "`holdout_items` newest history items, which assembly then does not "
                                              "read (see `strength`)")
    strengths: list[float] = Field([0.0, 0.5, 1.0], min_length=1, description="strength=auto: the candidates")
    holdout_items: int = _count(4, "strength=auto: at most this many items held out", most=10_000)
    strength_by: Literal["kind", "metric", "loss"] = Field(
        "kind", description="how auto scores a candidate: the task's metric on greedy outputs, or the outputs' "
        "loss; kind: metric for generation, loss for classification and rating")
    pick_by_loss: int = Field(0, ge=0, le=10_000, description="0: off. n: after the keys' pass, the n sharers with "
                              "the most weight in it are each tried whole (every piece they share, weight 1) on the "
                              "same history examples, and the recipe is the one whose update gives them the lowest "
                              "loss: n more forwards per target, no gradient (not in the paper)")
    key_index: Literal["auto", "exact", "approximate"] = Field(
        "auto", description="how pieces are found: every candidate scored (exact), or an IVF index (annindex.py) "
        "that finds the top-k with some loss of recall; auto: the index from annindex.LARGE_POOL sharers on, unless "
        "select is topp or whole, which score every candidate")
    nprobe: int = _count(64, "IVF lists the approximate index searches per position")

    @field_validator("strength", "strengths")
    @classmethod
    def _strength_range(cls, value: Any) -> Any:
        """An alpha outside [0, MAX_STRENGTH] (or NaN) would export an adapter of garbage."""
        for a in value if isinstance(value, list) else [value]:
            if a != "auto" and not 0 <= a <= MAX_STRENGTH:  # NaN fails both comparisons
                raise ValueError(f"a strength is a number from 0 to {MAX_STRENGTH:g}, got {a}")
        return value

    @model_validator(mode="after")
    def _something_to_pick(self) -> "AssemblySettings":
        if self.pick_by_loss and self.select == "none":
            raise ValueError("pick_by_loss picks among the sharers a rule mixes; select=none mixes none")
        return self


class CalibrationSettings(Settings):
    """After step 4: the pool chooses its selection rule on validation users (`calibration`)."""

    enabled: bool = Field(True, description="choose the selection rule on validation users once the pool is built; "
                                            "off when the rule is fixed by setting any rule field (key, "
                                            "assembly.mix, ...)")
    rules: list[str] = Field(list(GRID), description="the candidate rules, names of rules.RULES (default: rules.GRID, "
                                                     "all but the opt-in rules.OPT_IN); 'none' is always a candidate; "
                                                     "rules with gate or task-activation keys build their pool "
                                                     "(gates train; task keys take one forward per sharer)")
    max_users: int = Field(16, ge=1, le=MANY, description="validation users at most: the most active sharer candidates "
                                                 "that are not sharers")
    items: int = Field(32, ge=1, le=MANY, description="newest history items scored per validation user at most (and "
                                             "at most half of its history); assembly reads the items before them")
    queries: int = Field(128, ge=1, le=MANY, description="validation queries in all, dealt one per user in turn (most "
                                                "active first) until each is at `items` or the budget is spent: few "
                                                "long users give as much evidence as many short ones")
    alpha: float = Field(0.05, gt=0, lt=1, description="a rule replaces the non-personalized model only if better "
                                                       "on the validation queries at this level (paired, Holm)")
    statistic: Literal["metric", "likelihood"] = Field(
        "metric", description="what each rule is scored and tested by on a validation query: metric, its answer "
                              "by the task's selection metric (generates); likelihood, the loss of the query's own "
                              "output under the rule's adapter (no generation: one forward per query, and a "
                              "continuous score for the paired tests)")

    @field_validator("rules")
    @classmethod
    def _known(cls, rules: list[str]) -> list[str]:
        unknown = [r for r in rules if r not in RULES]
        if unknown:
            raise ValueError(f"unknown rules {unknown}; known: {', '.join(RULES)}")
        return [r for r in RULES if r in rules or r == "none"]  # grid order: ties go to the simpler


# Settings of steps 3-5 only: a derived run (`Run.derive`) may change these and reuse steps 0-2.
LATER_STEPS = ("device", "key", "key_noise", "key_clip", "key_delta", "share_ratio", "gate_train", "assembly",
               "calibration")
# Settings of step 1: a derived run may change these too; it then selects again, and each sharer it
# has in common with the run it derives from keeps its LoRA.
SELECTION_STEP = ("n_sharers", "selection", "min_sharer_items")
# What older run.json files held in `assembly` and the run now holds once.
_FROM_RUN = ("retrieval_copies", "max_len", "seed")


class RunConfig(Settings):
    """Everything a run depends on. Defaults are sized for SmolLM2-135M on 2 CPU cores (docs/hyperparameters.md)."""

    data: str = Field(description="data folder (task.json + users.jsonl)")
    data_sha256: str | None = Field(None, description="set by Run.create (`perpcs.data.data_sha256`): "
                                    "a changed data folder is refused")
    base: str | None = Field(None, description="base model: HF id, local folder or .gguf (None: SmolLM2-135M)")
    seed: int = Field(0, ge=0, lt=SEEDS, description="seeds the split, selection, every training run and "
                      "assembly's sampling")
    device: str = Field("auto", pattern=DEVICE, description="auto (cuda if present), cpu, cuda, cuda:N or mps")
    n_targets: int = _count(8, "target users: the most active")
    base_fraction: float = Field(0.3, ge=0, lt=1, description="share of the other users that train the task LoRA")
    n_sharers: int = _count(6, "sharers S chosen among the remaining candidates")
    selection: Literal["random", "active", "cluster"] = Field("cluster", description="sharer selection: random, "
                                                              "active or cluster")
    min_sharer_items: int = _count(10, "cluster: skip a cluster whose best user has fewer items", least=0)
    share_ratio: float = _positive(1.0, "sharing ratio rho: share of its positions each sharer shares", most=1)
    key: KeyKind = Field("activation", description="piece keys: gate (the paper's: PAPER_RULE), activation (the "
                         "sharer's mean activation with its LoRA on; the target scored as its pieces are installed) "
                         "or task-activation (both on the task model, no piece installed while scoring); with "
                         "calibration on, what it starts from")
    key_noise: float = Field(0.0, ge=0, le=MANY, allow_inf_nan=False, description="activation keys as "
                             "(epsilon, key_delta)-DP means (perpcs.dp, docs/privacy.md): Gaussian noise of std "
                             "key_noise times the sensitivity; 0: no noise, no clipping")
    key_clip: float = _positive(1.0, "key_noise: each example's vector is clipped to L2 norm key_clip * sqrt(d) "
                                "first")
    key_delta: float = Field(1e-5, gt=0, lt=1, description="key_noise: the delta of the (epsilon, delta) guarantee")
    retrieval_copies: bool = Field(False, description="train and assemble also on each item with its most "
                                   "similar earlier item in the prompt")
    max_len: int = _count(256, "tokens per example (long prompts lose their start)", least=16)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    task_train: TrainSettings = Field(default_factory=lambda: TrainSettings(lr=2e-3, steps=30, batch_size=8),
                                      description="step 0: the task LoRA on the base users")
    sharer_train: TrainSettings = Field(default_factory=lambda: TrainSettings(
        lr=3e-3, epochs=2, max_steps=160, val_fraction=0.1, val_items=8, patience=1, batch_size=4),
        description="step 2: each sharer's LoRA, and OPPU's")
    gate_train: TrainSettings = Field(default_factory=lambda: TrainSettings(lr=1e-2, steps=10, batch_size=4),
                                      description="step 3 with key=gate: the gates")
    assembly: AssemblySettings = Field(default_factory=lambda: AssemblySettings(mix="cat"),
                                       description="step 5 (with calibration on, its rule fields are only what "
                                       "calibration starts from)")
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings,
                                             description="after step 4: the pool chooses its selection rule")

    @model_validator(mode="before")
    @classmethod
    def _a_fixed_rule_is_not_calibrated(cls, data: Any) -> Any:
        """Settings that fix the selection rule (`RULE_FIELDS`) turn calibration off unless it is set too: the
        same whether they come from --set, a --config file, a bench variant or Python."""
        return with_rule_fixed(data) if isinstance(data, dict) else data

    @model_validator(mode="before")
    @classmethod
    def _assembly_reads_the_runs_format(cls, data: Any) -> Any:
        """Run folders and configs of older perpcs repeated `retrieval_copies`, `max_len` and `seed` in
        `assembly`: taken out where they say what the run says (assembly's seed was 0 by default)."""
        if not isinstance(data, dict) or not isinstance(data.get("assembly"), dict):
            return data
        assembly = dict(data["assembly"])
        for name in _FROM_RUN:
            if name in assembly:
                value = assembly.pop(name)
                run_value = data.get(name, cls.model_fields[name].default)
                if value != run_value and not (name == "seed" and value == 0):
                    raise ValueError(f"assembly.{name}={json.dumps(value)}: assembly uses the run's {name} "
                                     f"({json.dumps(run_value)}); set {name} instead")
        return {**data, "assembly": assembly}

    @model_validator(mode="after")
    def _key_noise_on_activation_keys(self) -> "RunConfig":
        """The mechanism is defined for activation keys over examples that each hold one history item."""
        if self.key_noise and (self.key not in MEAN_KEYS or self.retrieval_copies):
            raise ValueError(f"key_noise={self.key_noise} needs key=activation or task-activation and "
                             "retrieval_copies=false "
                             "(a gate is trained, not a mean; with retrieval copies one item is in several examples)")
        return self

    @model_validator(mode="after")
    def _dp_sgd_on_sharers(self) -> "RunConfig":
        """DP-SGD protects one example; with retrieval copies one item is in several (gates and the task LoRA
        train on other parameters or users, and are not covered)."""
        for name in ("task_train", "gate_train"):
            if getattr(self, name).dp_noise:
                raise ValueError(f"{name}.dp_noise: DP-SGD is a sharer_train setting (each sharer's LoRA)")
        if self.sharer_train.dp_noise and self.retrieval_copies:
            raise ValueError(f"sharer_train.dp_noise={self.sharer_train.dp_noise} needs retrieval_copies=false "
                             "(with retrieval copies one item is in several examples)")
        return self

    def updated(self, overrides: dict) -> "RunConfig":
        """These settings with `overrides` (nested sections merged key by key), validated."""
        return RunConfig.model_validate(deep_merge(self.model_dump(), overrides))

    def training(self, which: str, user_id: str = "") -> TrainSettings:
        """The settings of one training run, seeded from the run's seed, the step and the user
        (so each LoRA has its own initialisation and batch order, and the same seed repeats them)."""
        settings: TrainSettings = getattr(self, which)
        return settings.model_copy(update={"seed": derived_seed(self.seed, which, user_id)})


def check_later_steps(config: RunConfig, new: RunConfig, also: tuple[str, ...] = ()) -> RunConfig:
    """`new`, if it differs from `config` only in settings of steps 3-5 (and `also`): what a run
    derived from `config`'s run may change."""
    allowed = LATER_STEPS + also
    changed = [k for k in RunConfig.model_fields  # data_sha256: the data itself is checked when a run reads it
               if k not in allowed + ("data_sha256",) and getattr(new, k) != getattr(config, k)]
    if changed:
        raise ValueError(f"a derived run may change only {', '.join(allowed)}; "
                         f"not these: {', '.join(changed)}")
    return new


class PrimeSettings(Settings):
    """The bench's `prime` (see `perpcs.prime`)."""

    m: int = _count(3, "sharers mixed")
    items: int = _count(8, "the target's newest history items the loss is measured on")
    budget: int = _count(10, "loss evaluations in all")
    popsize: int = _count(5, "CMA-ES population: budget // popsize generations", least=2)
    sigma0: float = _positive(1.0, "initial step size on the softmax logits")

    @model_validator(mode="after")
    def _one_generation_at_least(self) -> "PrimeSettings":
        if self.budget < self.popsize:
            raise ValueError(f"prime budget {self.budget} is less than one CMA-ES generation (popsize {self.popsize})")
        return self


def _method_rows() -> list[str]:
    from perpcs.methods import rows

    return rows()


class BenchSettings(Settings):
    """What `perpcs bench` runs beside the pipeline (the run's own settings are its `RunConfig`)."""

    methods: list[str] = Field(default_factory=_method_rows, description="rows to run (`perpcs.methods`)")
    rag_k: int = _count(1, "history items BM25 puts in the prompt of a +rag row", most=1000)
    retrieval_m: int = _count(1, "peft_retrieval: sharers whose whole LoRAs are averaged")
    gen_batch_size: int = _count(16, "prompts per generate call", most=65536)
    variants: dict[str, dict] = Field({}, description="name -> settings of steps 3-5 (e.g. {'key': 'activation'}): "
                                      "each reuses the run's task model and sharer LoRAs (`Run.derive`) and is "
                                      "reported as rows `name` and `name+rag`")
    oppu_targets: int | None = Field(None, ge=1, le=MANY, description="OPPU (and oppu+rag) on the first M "
                                     "targets only, every other method on all: OPPU is the only method that trains "
                                     "per target; comparisons with it use the queries they share")
    prime: PrimeSettings = PrimeSettings()
    history_k: int | None = Field(None, ge=1, le=MANY, description="each target keeps only its newest K history items "
                                  "(OPPU trains on them, retrieval reads them; Per-Pcs reads its run's "
                                  "`assembly.recent_k`): the history curve (`perpcs curve`)")
    cost_targets: int = Field(2, ge=0, le=MANY, description="targets whose OPPU training and assembly are also "
                              "timed alternately in one process (perpcs.costs)")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        """Checked here, before the pipeline runs, not after it."""
        known = _method_rows()
        unknown = sorted(set(methods) - set(known))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(known)}")
        if not methods:
            raise ValueError(f"no methods to run; known: {', '.join(known)}")
        return methods

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, variants: dict[str, dict]) -> dict[str, dict]:
        known = _method_rows()
        for name in variants:
            if name in known or "+" in name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"variant name {name!r}: use letters, digits, - and _, and not a method's name")
        return variants


# --- presets ---

# `--preset NAME`: named settings (under --config and --set); "private" is what docs/privacy.md advises a
# privacy-sensitive pool, from the attacks measured there
PRESETS = {"paper": PAPER_RULE, "private": {"key_noise": 0.5}}
# The demo's data size and budgets: chosen so that `perpcs demo` runs in about 15 minutes on 2 CPU cores.
# Per-Pcs with the calibrated rule (on 8 validation users), and the paper's rule beside it as a variant
# (see README); no retrieval rows and no prime, OPPU on 4 of the 5 targets (the full bench and the evidence
# suite have them all).
DEMO_CONFIG = {"users": 48, "queries": 12,
               "run": {"n_targets": 5, "n_sharers": 6, "task_train": {"steps": 25},
                       "calibration": {"max_users": 8, "queries": 64}},
               "methods": ["non_personalized", "peft_retrieval", "oppu", "perpcs"], "oppu_targets": 4,
               "variants": {"perpcs-paper": PAPER_RULE}}

