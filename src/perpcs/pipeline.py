"""The Per-Pcs pipeline over a run folder: steps 0-5 of the method, each resumable.

    RUN/run.json                 the run's settings (RunConfig)
    RUN/split.json               base users / sharer candidates / target users
    RUN/task/adapter, merged/    step 0: task LoRA, and the base with it merged in
    RUN/selection.json           step 1: the sharers, with the reason each was chosen
    RUN/sharers/<id>/            step 2-3: a sharer's own LoRA (peft folder), its pieces with their keys
                                 (pieces.safetensors, what a Ray worker hands back) and training stats
    RUN/pool/                    step 4: the shared pieces and gates (see docs/pool.md)
    RUN/recipes/<id>.recipe      step 5: each target user's recipe (binary, see recipe_format.py)
    RUN/stats.json               seconds and sizes of every step
    RUN/run.lock                 held by the one process writing into the run

A step whose output exists is not redone (a finished sharer is not retrained).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import shutil
import time
from contextlib import contextmanager
from functools import cached_property, partial
from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from perpcs.assembly import Assembler, AssemblySettings, activation_means
from perpcs.data import Dataset, Item, User, data_sha256, load_dataset
from perpcs.dp import counted_examples, key_generator, key_privacy, noisy_keys
from perpcs.errors import InputError
from perpcs.gates import lora_layers, train_gates
from perpcs.models import fingerprint, load_base, prepare_base
from perpcs.pool import Pool, share_mask
from perpcs.recipe import ADAPTER_FILES, Recipe, export_adapter
from perpcs.recipe_format import EXTENSION as RECIPE_EXTENSION
from perpcs.selection import Selection, load_selection, save_selection, select_sharers
from perpcs.training import LoraSettings, TrainSettings, history_examples, lora_state, split_heldout, train_lora
from perpcs.utils import (atomic_dir, atomic_path, check_output_dir, deep_merge, read_json, remove_temp,
                          seed_everything, write_json)


# Settings of steps 3-5 only: a derived run (`Run.derive`) may change these and reuse steps 0-2.
LATER_STEPS = ("device", "key", "key_noise", "key_clip", "key_delta", "share_ratio", "gate_train", "assembly")
# Settings of step 1: a derived run may change these too; it then selects again, and each sharer it
# has in common with the run it derives from keeps its LoRA.
SELECTION_STEP = ("n_sharers", "selection", "min_sharer_items")


# The paper's selection rule exactly (trained gates, linear A/B mix, the assembled update as is):
# `--set key=gate --set assembly.mix=linear --set assembly.strength=1`.
PAPER_RULE = {"key": "gate", "assembly": {"mix": "linear", "strength": 1.0}}
# `--preset NAME`: named settings (under --config and --set); "private" is what docs/privacy.md advises a
# privacy-sensitive pool, from the attacks measured there
PRESETS = {"paper": PAPER_RULE, "private": {"key_noise": 0.5}}


class RunConfig(BaseModel):
    """Everything a run depends on. Defaults are sized for SmolLM2-135M on 2 CPU cores (docs/hyperparameters.md)."""

    model_config = ConfigDict(extra="forbid")
    data: str
    data_sha256: str | None = None  # set by Run.create (`perpcs.data.data_sha256`): a changed data folder is refused
    base: str | None = None
    seed: int = 0
    device: str = "auto"
    n_targets: int = 8
    base_fraction: float = 0.3
    n_sharers: int = 6
    selection: str = "cluster"
    min_sharer_items: int = 10
    share_ratio: float = 1.0
    # the default selection rule (README); the paper's: PAPER_RULE
    key: Literal["gate", "activation"] = "activation"
    # activation keys as (epsilon, key_delta)-DP means (perpcs.dp, docs/privacy.md): Gaussian noise of std key_noise
    # times the sensitivity, each example's vector clipped to key_clip * sqrt(d) first; 0: no noise, no clipping
    key_noise: float = Field(0.0, ge=0, allow_inf_nan=False)
    key_clip: float = Field(1.0, gt=0, allow_inf_nan=False)
    key_delta: float = Field(1e-5, gt=0, lt=1)
    retrieval_copies: bool = False
    max_len: int = 256
    lora: LoraSettings = Field(default_factory=LoraSettings)
    task_train: TrainSettings = Field(default_factory=lambda: TrainSettings(lr=2e-3, steps=30, batch_size=8))
    sharer_train: TrainSettings = Field(default_factory=lambda: TrainSettings(
        lr=3e-3, epochs=2, max_steps=160, val_fraction=0.1, val_items=8, patience=1, batch_size=4))
    gate_train: TrainSettings = Field(default_factory=lambda: TrainSettings(lr=1e-2, steps=10, batch_size=4))
    assembly: AssemblySettings = Field(default_factory=lambda: AssemblySettings(mix="cat"))

    @model_validator(mode="after")
    def _assembly_formats_history_as_training(self) -> "RunConfig":
        """Step 5 formats the history as step 2 did, unless `assembly.retrieval_copies` is set explicitly."""
        if "retrieval_copies" not in self.assembly.model_fields_set:
            self.assembly = self.assembly.model_copy(update={"retrieval_copies": self.retrieval_copies})
        return self

    @model_validator(mode="after")
    def _key_noise_on_activation_keys(self) -> "RunConfig":
        """The mechanism is defined for activation keys over examples that each hold one history item."""
        if self.key_noise and (self.key != "activation" or self.retrieval_copies):
            raise ValueError(f"key_noise={self.key_noise} needs key=activation and retrieval_copies=false "
                             "(a gate is trained, not a mean; with retrieval copies one item is in several examples)")
        return self

    def updated(self, overrides: dict) -> "RunConfig":
        """These settings with `overrides` (nested sections merged key by key), validated."""
        return RunConfig.model_validate(deep_merge(self.model_dump(), overrides))

    def training(self, which: str, user_id: str = "") -> TrainSettings:
        """The settings of one training run, seeded from the run's seed, the step and the user
        (so each LoRA has its own initialisation and batch order, and the same seed repeats them)."""
        settings: TrainSettings = getattr(self, which)
        key = f"{self.seed}:{which}:{user_id}".encode()
        return settings.model_copy(update={"seed": int.from_bytes(hashlib.sha256(key).digest()[:4], "big")})


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


def split_users(users: list[User], n_targets: int, base_fraction: float, seed: int) -> dict[str, list[str]]:
    """Targets: the n most active users (as in the paper); the rest, seeded shuffle: base users first, then candidates."""
    if n_targets < 1 or not 0 <= base_fraction < 1:
        raise ValueError(f"need n_targets >= 1 and 0 <= base_fraction < 1, got n_targets={n_targets}, "
                         f"base_fraction={base_fraction}")
    if n_targets >= len(users):
        raise ValueError(f"n_targets={n_targets} leaves no base users or sharers among {len(users)} users")
    by_activity = sorted(users, key=lambda u: (-len(u.history), u.user_id))
    targets = [u.user_id for u in by_activity[:n_targets]]
    rest = sorted(u.user_id for u in by_activity[n_targets:])
    random.Random(seed).shuffle(rest)
    n_base = max(1, round(base_fraction * len(rest))) if base_fraction > 0 else 0
    if n_base >= len(rest):
        raise ValueError(f"base_fraction={base_fraction} leaves no sharer candidates among {len(rest)} users")
    return {"base": sorted(rest[:n_base]), "candidates": sorted(rest[n_base:]), "targets": targets}


def safe_name(user_id: str) -> str:
    """A file name for a user id (ids may hold slashes); a hash suffix keeps distinct ids distinct."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:48]
    return f"{clean}-{hashlib.sha256(user_id.encode()).hexdigest()[:8]}"


def _writes(step):
    """A step that writes into the run folder holds the run's lock while it works (`Run.writing`)."""
    @functools.wraps(step)
    def locked(self, *args, **kwargs):
        with self.writing():
            return step(self, *args, **kwargs)
    return locked


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def save_pieces(path: Path, pieces: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """A sharer's (A, B, key) per position, in forward order (kept in the metadata: safetensors sorts names)."""
    tensors = {f"{pos}:{part}": t.contiguous() for pos, trio in pieces.items() for part, t in zip("ABk", trio)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"positions": json.dumps(list(pieces))})


def load_pieces(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    with safe_open(path, "pt") as f:
        return {pos: tuple(f.get_tensor(f"{pos}:{part}") for part in "ABk")
                for pos in json.loads(f.metadata()["positions"])}


def sharer_task(folder: str, user_id: str) -> dict:
    """Steps 2-3 for one sharer in another process (a Ray worker), which opens the run itself."""
    return Run(folder).sharer_pieces(user_id)


def assemble_task(folder: str, user_ids: list[str]) -> dict[str, float]:
    """Step 5 for some users in another process (a Ray worker); seconds per user."""
    return Run(folder).assemble_users(user_ids)


class Run:
    """A run folder. `Run.create(folder, config)` starts or resumes one; the step methods fill it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "run.json").exists():
            raise FileNotFoundError(f"{self.folder}: not a perpcs run folder (no run.json); start one with `perpcs pipeline`")
        self.config = RunConfig.model_validate(read_json(self.folder / "run.json"))
        self.device = resolve_device(self.config.device)
        self.lock = FileLock(self.folder / "run.lock", timeout=0)

    @contextmanager
    def writing(self):
        """Hold the run's lock: one process writes into a run folder at a time (a second is refused,
        not queued). The first to take it removes what interrupted atomic writes left behind."""
        try:
            self.lock.acquire()
        except Timeout:
            raise InputError(f"{self.folder}: another perpcs process is working on this run folder (it holds "
                             f"{self.lock.lock_file}); wait for it to finish, or use another --run") from None
        try:
            if self.lock.lock_counter == 1:
                remove_temp(self.folder)
            yield
        finally:
            self.lock.release()

    def check_data(self, sha: str) -> None:
        """Refuse data that changed since the run was made: its split, sharers and recipes name its users."""
        if self.config.data_sha256 not in (None, sha):
            raise InputError(f"{self.config.data}: the data folder changed since run {self.folder} was made "
                             f"(task.json or users.jsonl differs from the data_sha256 in {self.folder / 'run.json'}); "
                             "restore the data or use a new --run folder")

    @classmethod
    def create(cls, folder: str | Path, config: RunConfig) -> "Run":
        """Start a run, or resume one whose saved settings are the same (else refuse: its outputs would mix)."""
        folder = Path(folder)
        path = folder / "run.json"
        config = config.model_copy(update={"data_sha256": data_sha256(config.data)})
        if path.exists():
            cls(folder).check_data(config.data_sha256)
            saved = RunConfig.model_validate(read_json(path))
            diff = [k for k in RunConfig.model_fields if k != "data_sha256" and getattr(saved, k) != getattr(config, k)]
            if diff:
                raise ValueError(f"{path}: this run folder was made with other settings ({', '.join(diff)}); "
                                 "use a new --run folder")
        else:
            write_json(path, config.model_dump())
        return cls(folder)

    def derive(self, folder: str | Path, config: RunConfig) -> "Run":
        """A run that reuses this run's task model and split and does the rest with `config`, which may
        differ only in settings of step 1 and steps 3-5. With the same step-1 settings it keeps the very
        same sharers, to compare piece keys, sharing ratios or assembly settings on them; with others it
        selects again (e.g. more sharers), and every sharer both runs have keeps its LoRA. Reused files
        are linked, not copied; their recorded seconds come along."""
        check_later_steps(self.config, config, also=SELECTION_STEP)
        self.check_data(data_sha256(config.data))
        reselect = any(getattr(config, k) != getattr(self.config, k) for k in SELECTION_STEP)
        mine = {s.user_id for s in self.select()}
        unfinished = sorted(u for u in mine if not (self.sharer_dir(u) / "lora.json").exists())
        if not self.merged_path.exists() or unfinished:
            raise ValueError(f"{self.folder}: steps 0-2 are not finished (sharers without a LoRA: {unfinished})")
        new = Run.create(folder, config)
        kept_files, kept_steps = ["split.json"], ["task_adapt"]
        if not reselect:
            kept_files.append("selection.json")
            kept_steps.append("select")
        for name in kept_files:
            if not (new.folder / name).exists():
                shutil.copy(self.folder / name, new.folder / name)
        stats = self.stats()
        for step in kept_steps:
            if step in stats:
                new.record(step, stats[step])
        links = [("task", "task")] + [(f"sharers/{safe_name(s.user_id)}/{f}",) * 2 for s in new.select()
                                      if s.user_id in mine for f in ("adapter", "lora.json")]
        for src, dst in links:
            if not (new.folder / dst).exists():
                (new.folder / dst).parent.mkdir(parents=True, exist_ok=True)
                (new.folder / dst).symlink_to((self.folder / src).resolve())
        return new

    # --- shared state ---

    @cached_property
    def data(self) -> Dataset:
        self.check_data(data_sha256(self.config.data))
        return load_dataset(self.config.data)

    def users(self, ids: list[str]) -> list[User]:
        return [self.data.user(i) for i in ids]

    @cached_property
    def split(self) -> dict[str, list[str]]:
        path = self.folder / "split.json"
        if not path.exists():
            c = self.config
            write_json(path, split_users(self.data.users, c.n_targets, c.base_fraction, c.seed))
        return read_json(path)

    def record(self, step: str, stats: dict) -> None:
        with self.writing():  # read-modify-write: under the lock, so no other process's step is lost
            write_json(self.folder / "stats.json", {**self.stats(), step: stats})

    def stats(self) -> dict:
        path = self.folder / "stats.json"
        return read_json(path) if path.exists() else {}

    def examples(self, user: User, tokenizer) -> list:
        c = self.config
        return history_examples(self.data.task, tokenizer, user.history, c.max_len, c.retrieval_copies, user.profile)

    def user_lora(self, user: User, desc: str):
        """A fresh LoRA on one user's own history with `sharer_train`'s budget, the same for sharers
        and OPPU: epochs with a step cap, stopped on the user's newest items (held out of training)."""
        c = self.config
        model, tok = self.merged
        settings = c.training("sharer_train", user.user_id)
        items, heldout = split_heldout(user.history, settings)
        examples = history_examples(self.data.task, tok, items, c.max_len, c.retrieval_copies, user.profile)
        val = history_examples(self.data.task, tok, heldout, c.max_len, False, user.profile)
        return train_lora(model, examples, c.lora, settings, tok.pad_token_id, desc=desc, val_examples=val)

    @property
    def merged_path(self) -> Path:
        return self.folder / "task" / "merged"

    @cached_property
    def merged(self):
        """(model, tokenizer) of the task-adapted base, loaded once per process."""
        self.task_adapt()
        return load_base(self.merged_path, device=self.device)

    @cached_property
    def merged_fingerprint(self) -> str:
        return read_json(self.folder / "task" / "fingerprint.json")["fingerprint"]

    # --- step 0 ---

    def task_adapt(self) -> Path:
        """Train the task LoRA on the base users' histories and merge it into the base (once).

        The merged folder is written last, after its fingerprint and stats: it marks step 0 done, so
        a crash at any point leaves a run that redoes step 0 (the same seed gives the same model)."""
        fingerprint_path = self.folder / "task" / "fingerprint.json"
        if (self.merged_path / "config.json").exists() and fingerprint_path.exists():
            return self.merged_path
        with self.writing():
            c = self.config
            seed_everything(c.seed)
            t_load = time.perf_counter()
            model, tok = load_base(prepare_base(c.base), device=self.device)
            load_seconds = time.perf_counter() - t_load
            examples = [e for u in self.users(self.split["base"]) for e in self.examples(u, tok)]
            peft_model, stats = train_lora(model, examples, c.lora, c.training("task_train"), tok.pad_token_id,
                                           desc="step 0: task LoRA")
            peft_model.save_pretrained(self.folder / "task" / "adapter")
            merged = peft_model.merge_and_unload()
            write_json(fingerprint_path, {"fingerprint": fingerprint(merged)})
            self.record("task_adapt", {**stats, "examples": len(examples), "base_load_seconds": load_seconds})
            with atomic_dir(self.merged_path, replace=True) as tmp:  # replace=True: a merged folder without its
                merged.save_pretrained(tmp)                          # fingerprint, left by an older perpcs
                tok.save_pretrained(tmp)
        return self.merged_path

    # --- step 1 ---

    def select(self) -> list[Selection]:
        path = self.folder / "selection.json"
        if not path.exists():
            with self.writing():
                c = self.config
                t0 = time.perf_counter()
                sel = select_sharers(self.users(self.split["candidates"]), c.n_sharers, c.selection, c.seed,
                                     c.min_sharer_items)
                save_selection(path, sel)
                self.record("select", {"seconds": time.perf_counter() - t0, "sharers": len(sel)})
        return load_selection(path)

    # --- steps 2-4 ---

    @property
    def pool_path(self) -> Path:
        return self.folder / "pool"

    def sharer_dir(self, user_id: str) -> Path:
        return self.folder / "sharers" / safe_name(user_id)

    @_writes
    def build_pool(self, executor=None) -> Pool:
        """Steps 2-3 for each sharer (`sharer_pieces`: here, or as tasks on an `executor.map`, e.g. Ray
        workers), then step 4 here, in sharer order: every executor builds the same pool."""
        c = self.config
        pool = Pool.open(self.pool_path, self.merged_fingerprint) if (self.pool_path / "pool.sqlite").exists() else None
        selection = self.select()
        if not selection:
            raise ValueError(f"{self.folder / 'selection.json'}: no sharer was selected (every cluster skipped? "
                             "lower min_sharer_items or use another selection strategy)")
        todo = [s.user_id for s in selection if not ((self.sharer_dir(s.user_id) / "stats.json").exists()
                                                     and pool is not None and pool.pseudonym(s.user_id) in pool.sharers())]
        results = (map(self.sharer_pieces, tqdm(todo, desc="steps 2-4: sharers")) if executor is None
                   else executor.map(partial(sharer_task, str(self.folder)), todo, desc="steps 2-4: sharers"))
        for stats, user_id in zip(results, todo):  # results first: the progress bar runs to its end
            pieces = load_pieces(self.sharer_dir(user_id) / "pieces.safetensors")
            if pool is None:
                shapes = {pos: (A.shape[1], B.shape[0]) for pos, (A, B, _) in pieces.items()}
                noise = key_privacy(c.key_noise, c.key_clip, c.key_delta, len(shapes)) if c.key_noise else None
                pool = Pool.create(self.pool_path, self.merged_fingerprint, c.lora.model_dump(), shapes,
                                   seed=c.seed, sharing_ratio=c.share_ratio, key=c.key, key_privacy=noise)
            sid = pool.add_sharer(user_id, pieces, share_mask(pool.positions, c.share_ratio, c.seed, user_id))
            write_json(self.sharer_dir(user_id) / "stats.json", {"sharer_id": sid, **stats})
        self.record("build_pool", self._pool_stats(pool))
        return pool

    def sharer_pieces(self, user_id: str) -> dict:
        """Steps 2-3 for one sharer: its LoRA and piece keys, saved in its folder (pieces.safetensors),
        not yet in the pool; what a worker runs. Returns the training stats."""
        folder = self.sharer_dir(user_id)
        if (folder / "pieces.json").exists():
            return read_json(folder / "pieces.json")
        model, tok = self.merged
        examples = self.examples(self.data.user(user_id), tok)
        peft_model, lora_stats = self.sharer_lora(user_id, model)
        keys, key_stats = self.piece_keys(user_id, peft_model, examples, tok.pad_token_id)
        save_pieces(folder / "pieces.safetensors", {pos: (A, B, keys[pos]) for pos, (A, B) in lora_state(peft_model).items()})
        peft_model.unload()
        stats = {"lora": lora_stats, "keys": key_stats, "examples": len(examples)}
        write_json(folder / "pieces.json", stats)
        return stats

    def sharer_lora(self, user_id: str, model):
        """Step 2: the sharer's own LoRA, trained once and kept (a pool rebuilt with other keys reuses it)."""
        from peft import PeftModel

        folder = self.sharer_dir(user_id)
        if (folder / "lora.json").exists():
            return PeftModel.from_pretrained(model, folder / "adapter"), read_json(folder / "lora.json")
        peft_model, stats = self.user_lora(self.data.user(user_id), desc=f"sharer {user_id}: LoRA")
        peft_model.save_pretrained(folder / "adapter")
        write_json(folder / "lora.json", stats)
        return peft_model, stats

    def piece_keys(self, user_id: str, peft_model, examples: list, pad_id: int) -> tuple[dict, dict]:
        """Step 3: each piece's key - its gate trained with the LoRA frozen (the paper), or the
        sharer's mean activation at its position over its own history with its LoRA on (`key=activation`)."""
        if self.config.key == "gate":
            return train_gates(peft_model, examples, self.config.training("gate_train", user_id), pad_id,
                               desc=f"sharer {user_id}: gates")
        c, t0 = self.config, time.perf_counter()
        keys = activation_means(peft_model, lora_layers(peft_model), examples, pad_id, c.assembly.batch_size,
                                clip=c.key_clip if c.key_noise else None)
        if c.key_noise:
            keys = noisy_keys(keys, counted_examples(examples), c.key_clip, c.key_noise, key_generator(c.seed, user_id))
        return keys, {"seconds": time.perf_counter() - t0}

    def _pool_stats(self, pool: Pool) -> dict:
        per = [read_json(self.sharer_dir(s.user_id) / "stats.json") for s in self.select()]
        return {"sharers": len(pool), "pool_bytes": pool.nbytes(),
                "sharer_lora_seconds": sum(p["lora"]["seconds"] for p in per),
                "gate_seconds": sum(p["keys"]["seconds"] for p in per)}

    def open_pool(self) -> Pool:
        return Pool.open(self.pool_path, self.merged_fingerprint, self.config.lora.model_dump())

    # --- step 5 ---

    def recipe_path(self, user_id: str) -> Path:
        """The binary recipe (`recipe_format`); a JSON one where an older perpcs wrote that."""
        old = self.folder / "recipes" / f"{safe_name(user_id)}.json"
        return old if old.exists() else old.with_suffix(RECIPE_EXTENSION)

    @_writes
    def assemble(self, user_ids: list[str] | None = None, executor=None) -> dict[str, Recipe]:
        """A recipe for each target user (or the given users) from their own history; no training.
        With an `executor`, users are assembled in chunks, one per worker."""
        user_ids = self.split["targets"] if user_ids is None else user_ids
        todo = [u for u in user_ids if not self.recipe_path(u).exists()]
        if executor is None:
            self.merged  # loaded before the clock starts: users per hour is the steady rate
        t_all = time.perf_counter()
        if executor is None or not todo:
            seconds = self.assemble_users(todo)
        else:
            chunks = [todo[i :: executor.workers] for i in range(min(executor.workers, len(todo)))]
            seconds = {u: s for part in executor.map(partial(assemble_task, str(self.folder)), chunks,
                                                     desc="step 5: assemble") for u, s in part.items()}
        if seconds:
            users_per_hour = 3600 * len(seconds) / (time.perf_counter() - t_all)
            before = self.stats().get("assemble", {})
            self.record("assemble", {"seconds_per_user": {**before.get("seconds_per_user", {}), **seconds},
                                     "users_per_hour": users_per_hour,
                                     "recipe_bytes": {**before.get("recipe_bytes", {}),
                                                      **{u: self.recipe_path(u).stat().st_size for u in seconds}}})
        return {u: Recipe.load(self.recipe_path(u)) for u in user_ids}

    def assemble_users(self, user_ids: list[str]) -> dict[str, float]:
        """Step 5 for these users of the run's data, each recipe saved as it is made; seconds per user."""
        if not user_ids:
            return {}
        model, tok = self.merged
        assembler = Assembler(model, self.open_pool(), self.config.assembly)
        seconds = {}
        try:
            for uid in tqdm(user_ids, desc="step 5: assemble"):
                user = self.data.user(uid)
                t0 = time.perf_counter()
                recipe = assembler.recipe(self.data.task, tok, user.history, user.profile, user=uid)
                seconds[uid] = recipe.seconds = time.perf_counter() - t0
                recipe.save(self.recipe_path(uid))
        finally:
            assembler.unload()
        return seconds

    def assemble_history(self, user_id: str, history: list[Item], profile: str | None = None) -> Recipe:
        """The recipe of a user who need not be in the run's data, from the history given (not kept);
        saved with the others, so `export` and `perpcs serve` find it."""
        model, tok = self.merged
        assembler = Assembler(model, self.open_pool(), self.config.assembly)
        try:
            recipe = assembler.recipe(self.data.task, tok, history, profile, user=user_id)
        finally:
            assembler.unload()
        recipe.save(self.recipe_path(user_id))
        return recipe

    def export(self, user_id: str, out: str | Path, force: bool = False) -> Path:
        """Write the user's assembled PEFT as a standard peft adapter folder. `out` may be new, empty or
        a previous adapter; another folder only with `force`; never the current folder, its parents,
        the run folder or the data folder (or anything in them)."""
        path = self.recipe_path(user_id)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no recipe for user {user_id!r}; run `perpcs assemble` first")
        check_output_dir(out, ADAPTER_FILES, (self.folder, Path(self.config.data)), force)
        return export_adapter(Recipe.load(path), self.open_pool(), out, str(self.merged_path.resolve()), replace=True)

    def export_base(self, out: str | Path) -> Path:
        """The merged, task-adapted base as a plain HF folder: what exported adapters apply to (vLLM, LoRAX)."""
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out}: exists and is not an empty folder; choose a new --out")
        with atomic_dir(out) as tmp:
            shutil.copytree(self.task_adapt(), tmp, dirs_exist_ok=True)
        return out

    def pipeline(self, executor=None) -> dict[str, Recipe]:
        self.task_adapt()
        self.select()
        self.build_pool(executor)
        return self.assemble(executor=executor)
