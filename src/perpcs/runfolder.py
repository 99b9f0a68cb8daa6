"""A run folder: where each step's output lives, its lock, its data and split, and its stats.

    RUN/run.json                 the run's settings (settings.RunConfig)
    RUN/split.json               base users / sharer candidates / target users
    RUN/task/adapter, merged/    step 0: task LoRA, and the base with it merged in
    RUN/selection.json           step 1: the sharers, with the reason each was chosen
    RUN/sharers/<id>/            step 2-3: a sharer's own LoRA (peft folder), its pieces with their keys
                                 (pieces.safetensors, what a Ray worker hands back) and training stats
    RUN/pool/                    step 4: the shared pieces and gates (see docs/pool.md)
    RUN/calibration.json         after step 4: the selection rule the pool chose on validation users, with the
                                 evidence (see calibration.py; a copy without predictions in the pool folder)
    RUN/keys/<key>/              a run derived for a pool of another key kind, when calibration's rules need one
    RUN/recipes/<id>.recipe      step 5: each target user's recipe (binary, see recipe_format.py)
    RUN/stats.json               seconds and sizes of every step
    RUN/run.lock                 held by the one process writing into the run

`RunFolder` reads what the steps wrote; `pipeline.Run` adds the steps that write it.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from pydantic import ValidationError

from perpcs.data import Dataset, User, data_sha256, format_validation_error, load_dataset, text_problem
from perpcs.errors import InputError
from perpcs.models import load_base
from perpcs.neighbours import NeighbourTable
from perpcs.pool import Pool
from perpcs.recipe_format import EXTENSION as RECIPE_EXTENSION
from perpcs.selection import Selection, load_selection
from perpcs.settings import AssemblySettings, RunConfig
from perpcs.training import history_examples
from perpcs.utils import check_output_dir, read_json, remove_temp, write_json

# What a run folder holds (see above): a new run goes only into a folder that holds nothing else
LAYOUT = {"run.json", "split.json", "task", "selection.json", "sharers", "pool", "calibration.json", "keys",
          "recipes", "stats.json", "run.lock", "oppu"}


def split_users(users: list[User], n_targets: int, base_fraction: float, seed: int) -> dict[str, list[str]]:
    """Targets: the n most active users (as in the paper); the rest, seeded shuffle: base users first,
    then candidates."""
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


def check_split(split, known: set[str], path: Path) -> dict[str, list[str]]:
    """A split.json as read: three lists of distinct users of the run's data set, none in two of them."""
    if not isinstance(split, dict) or sorted(split) != ["base", "candidates", "targets"]:
        raise InputError(f"{path}: expected an object with the lists 'base', 'candidates' and 'targets'")
    seen: set[str] = set()
    for part, ids in split.items():
        if not isinstance(ids, list) or not all(isinstance(u, str) for u in ids):
            raise InputError(f"{path}: field '{part}': expected a list of user ids")
        for i, u in enumerate(ids):
            if u not in known:
                raise InputError(f"{path}: field '{part}.{i}': no user {u!r} in the run's data set")
            if u in seen:
                raise InputError(f"{path}: field '{part}.{i}': user {u!r} is listed twice")
            seen.add(u)
    return split


def safe_name(user_id: str) -> str:
    """A file name for a user id (ids may hold slashes); a hash suffix keeps distinct ids distinct."""
    problem = text_problem(user_id)
    if problem:
        raise InputError(f"user id {user_id!r}: {problem}")
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:48]
    return f"{clean}-{hashlib.sha256(user_id.encode()).hexdigest()[:8]}"


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def writes(step):
    """A step that writes into the run folder holds the run's lock while it works (`RunFolder.writing`)."""
    @functools.wraps(step)
    def locked(self, *args, **kwargs):
        with self.writing():
            return step(self, *args, **kwargs)
    return locked


class RunFolder:
    """An existing run folder, opened: its settings, paths, lock, data, split, stats and merged model."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "run.json").exists():
            raise FileNotFoundError(f"{self.folder}: not a perpcs run folder (no run.json); "
                                    "start one with `perpcs pipeline`")
        saved = read_json(self.folder / "run.json")
        if not isinstance(saved, dict):
            raise InputError(f"{self.folder / 'run.json'}: expected a JSON object of RunConfig fields")
        saved.setdefault("calibration", {"enabled": False})  # a run made before calibration keeps its fixed rule
        try:
            self.config = RunConfig.model_validate(saved)
        except ValidationError as e:
            raise InputError(format_validation_error(str(self.folder / "run.json"), e)) from None
        self.device = resolve_device(self.config.device)
        self.lock = FileLock(self.folder / "run.lock", timeout=0)

    @classmethod
    def create(cls, folder: str | Path, config: RunConfig):
        """Start a run, or resume one whose saved settings are the same (else refuse: its outputs would mix)."""
        folder = Path(folder)
        path = folder / "run.json"
        config = config.model_copy(update={"data_sha256": data_sha256(config.data)})
        if path.exists():
            cls(folder).check_data(config.data_sha256)
            saved = cls(folder).config
            diff = [k for k in RunConfig.model_fields if k != "data_sha256" and getattr(saved, k) != getattr(config, k)]
            if diff:
                raise ValueError(f"{path}: this run folder was made with other settings ({', '.join(diff)}); "
                                 "use a new --run folder")
        else:
            check_output_dir(folder, LAYOUT, (Path(config.data),))
            write_json(path, config.model_dump())
        return cls(folder)

    @contextmanager
    def writing(self):
        """Hold the run's lock: one process writes into a run folder at a time (a second is refused,
        not queued). The first to take it removes what interrupted atomic writes left behind."""
        try:
            self.lock.acquire()
        except Timeout:
            raise InputError(f"{self.folder}: another perpcs process is working on this run folder (it holds "
                             f"{self.lock.lock_file}); wait for it to finish, or use another --run") from None
        except OSError as e:  # e.g. a read-only run folder
            raise InputError(f"{self.lock.lock_file}: cannot take the run's lock ({e.strerror or e}); "
                             "a run folder perpcs writes into must be writable") from None
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

    # --- the data and its split ---

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
        return check_split(read_json(path), {u.user_id for u in self.data.users}, path)

    def examples(self, user: User, tokenizer) -> list:
        """A user's history as training examples, in the run's format."""
        c = self.config
        return history_examples(self.data.task, tokenizer, user.history, c.max_len, c.retrieval_copies, user.profile)

    # --- stats ---

    def record(self, step: str, stats: dict) -> None:
        with self.writing():  # read-modify-write: under the lock, so no other process's step is lost
            write_json(self.folder / "stats.json", {**self.stats(), step: stats})

    def stats(self) -> dict:
        path = self.folder / "stats.json"
        return read_json(path) if path.exists() else {}

    # --- what the steps wrote ---

    @property
    def merged_path(self) -> Path:
        return self.folder / "task" / "merged"

    @cached_property
    def merged(self):
        """(model, tokenizer) of the task-adapted base, loaded once per process."""
        if not (self.merged_path / "config.json").exists():
            raise FileNotFoundError(f"{self.merged_path}: step 0 is not done; "
                                    f"run `perpcs task-adapt --run {self.folder}`")
        return load_base(self.merged_path, device=self.device)

    @cached_property
    def merged_fingerprint(self) -> str:
        return read_json(self.folder / "task" / "fingerprint.json")["fingerprint"]

    def selection(self) -> list[Selection]:
        """The sharers step 1 chose."""
        return load_selection(self.folder / "selection.json")

    def sharer_dir(self, user_id: str) -> Path:
        return self.folder / "sharers" / safe_name(user_id)

    @property
    def pool_path(self) -> Path:
        return self.folder / "pool"

    def own_pool(self) -> Pool:
        """This run's pool, of its own key kind."""
        return Pool.open(self.pool_path, self.merged_fingerprint, self.config.lora.model_dump())

    @property
    def calibration_path(self) -> Path:
        return self.folder / "calibration.json"

    @property
    def neighbours_path(self) -> Path:
        """Where select="neighbours" keeps its table (`perpcs.neighbours`)."""
        return self.folder / "neighbours"

    def neighbour_table(self, settings: AssemblySettings | None = None) -> NeighbourTable | None:
        """The neighbour table when the run's rule (or `settings`) reads one, else None."""
        if (settings or self.rule.assembly).select != "neighbours":
            return None
        if not (self.neighbours_path / "neighbours.json").exists():
            raise InputError(f"{self.neighbours_path}: no neighbour table; `perpcs calibrate --run {self.folder}` "
                             "or `perpcs assemble` builds it")
        return NeighbourTable.from_pretrained(self.neighbours_path)

    @cached_property
    def rule(self) -> RunConfig:
        """The settings assembly uses: the run's own, or with calibration on, with the rule it chose."""
        if not self.config.calibration.enabled:
            return self.config
        if not self.calibration_path.exists():
            raise FileNotFoundError(f"{self.calibration_path}: calibration is not done; "
                                    f"run `perpcs calibrate --run {self.folder}`")
        return self.config.updated(read_json(self.calibration_path)["rule"])

    def key_folder(self, key: str) -> "RunFolder":
        """The run holding the pool of key kind `key`: this one, or the one derived into RUN/keys/<key>."""
        return self if key == self.config.key else RunFolder(self.folder / "keys" / key)

    def open_pool(self) -> Pool:
        """The pool the run's selection rule assembles from (with calibration on, the chosen rule's)."""
        return self.key_folder(self.rule.key).own_pool()

    def recipe_path(self, user_id: str) -> Path:
        """The binary recipe (`recipe_format`); a JSON one where an older perpcs wrote that."""
        old = self.folder / "recipes" / f"{safe_name(user_id)}.json"
        return old if old.exists() else old.with_suffix(RECIPE_EXTENSION)
