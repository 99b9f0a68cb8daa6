"""The schema of a bench's results.json, which `bench` writes and `report` reads through it.

Field order is the file's order. Sections that only some benches have (known latent groups,
variants, alternating costs, calibration, mixing) are left out of the file when absent.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from perpcs.data import format_validation_error
from perpcs.errors import InputError
from perpcs.utils import read_json, write_json

Number = int | float


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodResult(_Schema):
    metrics: dict[str, Number]  # the task's metrics and `n`, the queries scored
    personalize_seconds_per_user: float
    bytes_per_user: Number
    cut_short: float  # share of answers that reached the token budget


class PrimaryMetric(_Schema):
    name: str
    higher_is_better: bool


class OneTime(_Schema):
    task_adapt_seconds: float
    sharer_lora_seconds: float
    gate_seconds: float
    pool_bytes: int
    model_load_seconds: float


class Machine(_Schema):
    platform: str
    processor: str
    torch_threads: int
    device: str


class PerUser(_Schema):
    sharers: dict[str, dict]  # training budget of each sharer's LoRA (epochs, steps, early stop, losses)
    oppu: dict[str, dict]  # the same for each target's OPPU
    strength: dict[str, float]  # the strength of each target's recipe


class Diagnostics(_Schema):
    same_group_weight: float | None  # None when no recipe has a piece (the pool declined)
    same_group_chance: float | None
    sharer_groups: list[int]


class Variant(_Schema):
    settings: dict
    gate_seconds: float
    pool_bytes: int
    diagnostics: Diagnostics | None = None


class Comparison(_Schema):
    n: int
    wins: int
    losses: int
    ties: int
    p: float
    diff: float
    ci: list[float]


class MethodStatistics(_Schema):
    n: int
    mean: float
    ci: list[float]
    vs: dict[str, Comparison | None]
    gain_share: float | None


class Statistics(_Schema):
    level: float
    ci: str
    test: str
    seed: int
    methods: dict[str, MethodStatistics]
    pairing: str | None = None


class Spread(_Schema):
    median: float
    q1: float
    q3: float
    min: float
    max: float


class AlternatingCosts(_Schema):
    users: dict[str, dict[str, Number]]
    time_ratio: Spread
    storage_ratio: Spread
    history_budget: dict[str, int | None]


class BenchResults(_Schema):
    dataset: str
    task: str
    kind: str
    base_model: str
    base_fingerprint: str
    seed: int
    n_targets: int
    n_sharers: int
    n_queries: int
    oppu_targets: int | None
    primary_metric: PrimaryMetric
    methods: dict[str, MethodResult]
    one_time: OneTime
    machine: Machine
    date: str
    config: dict
    per_user: PerUser
    diagnostics: Diagnostics | None = None
    variants: dict[str, Variant] | None = None
    statistics: Statistics
    alternating_costs: AlternatingCosts | None = None
    calibration: dict | None = None  # the rule the pool chose and its evidence (`calibration.choose_rule`)
    # per Per-Pcs row: effective sharers and spread between targets (`mixing.summarize`)
    mixing: dict[str, dict] | None = None

    def as_json(self) -> dict:
        """The file's content: what is None in an optional section is left out."""
        return _drop_absent(self, self.model_dump(mode="json"))

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.as_json())

    @classmethod
    def load(cls, path: str | Path) -> "BenchResults":
        try:
            return cls.model_validate(read_json(path))
        except ValidationError as e:
            raise InputError(format_validation_error(f"{path}: not the results.json of this perpcs bench", e)) from None


_OPTIONAL = {"diagnostics", "variants", "alternating_costs", "pairing", "calibration", "mixing"}


def _drop_absent(model: BaseModel, dumped: dict) -> dict:
    """`dumped` without the optional sections `model` lacks (None), at any depth."""
    out = {}
    for name, value in dumped.items():
        field = getattr(model, name)
        if name in _OPTIONAL and field is None:
            continue
        if isinstance(field, BaseModel):
            value = _drop_absent(field, value)
        elif isinstance(field, dict):
            value = {k: _drop_absent(v, value[k]) if isinstance(v, BaseModel) else value[k] for k, v in field.items()}
        out[name] = value
    return out
