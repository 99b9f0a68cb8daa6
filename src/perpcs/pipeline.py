"""The Per-Pcs pipeline over a run folder (`runfolder` says what lives where): steps 0-5, each resumable,
with calibration (the pool choosing its selection rule, `calibration`) between steps 4 and 5.

A step whose output exists is not redone (a finished sharer is not retrained). Steps 2-3 and 5 can
run as tasks on an executor (`executors`, e.g. Ray workers), which open the run folder themselves.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from functools import cached_property, partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from perpcs.assembly import activation_means
from perpcs.calibration import calibrate, neighbour_table, run_validation_users
from perpcs.data import Item, data_sha256
from perpcs.dp import counted_examples, key_generator, key_privacy, lora_privacy, noisy_keys
from perpcs.errors import InputError
from perpcs.export import export_base, export_user
from perpcs.gates import train_gates
from perpcs.lora import load_or_train, lora_layers, lora_state
from perpcs.models import fingerprint, load_base, prepare_base
from perpcs.pool import Pool
from perpcs.recipe import Recipe
from perpcs.rules import RULES
from perpcs.run_assembly import assemble_history, assemble_users
from perpcs.runfolder import RunFolder, safe_name, writes
from perpcs.selection import Selection, save_selection, select_sharers, share_mask
from perpcs.settings import SELECTION_STEP, RunConfig, check_later_steps
from perpcs.training import split_heldout, train_lora
from perpcs.user_lora import train_user_lora
from perpcs.utils import atomic_dir, atomic_path, link, read_json, seed_everything, write_json


def save_pieces(path: Path, pieces: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """A sharer's (A, B, key) per position, in forward order (kept in the metadata: safetensors sorts names)."""
    tensors = {f"{pos}:{part}": t.contiguous() for pos, trio in pieces.items() for part, t in zip("ABk", trio)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"positions": json.dumps(list(pieces))})


def load_pieces(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """What `save_pieces` wrote (the pool checks the tensors as they enter it)."""
    try:
        with safe_open(path, "pt") as f:
            return {pos: tuple(f.get_tensor(f"{pos}:{part}") for part in "ABk")
                    for pos in json.loads(f.metadata()["positions"])}
    except (SafetensorError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: not a readable file of a sharer's pieces ({e}); delete the sharer's folder "
                         "to train it again") from None


def sharer_task(folder: str, user_id: str) -> dict:
    """Steps 2-3 for one sharer in another process (a Ray worker), which opens the run itself."""
    return Run(folder).sharer_pieces(user_id)


def assemble_task(folder: str, user_ids: list[str]) -> dict[str, float]:
    """Step 5 for some users in another process (a Ray worker); seconds per user."""
    return assemble_users(RunFolder(folder), user_ids)


class Run(RunFolder):
    """A run folder with its steps. `Run.create(folder, config)` starts or resumes one; the step methods fill it."""

    def derive(self, folder: str | Path, config: RunConfig) -> "Run":
        """A run that reuses this run's task model and split and does the rest with `config`, which may
        differ only in settings of step 1, `sharer_train` and steps 3-5. With the same step-1 settings it keeps
        the very same sharers, to compare piece keys, sharing ratios or assembly settings on them; with others
        it selects again (e.g. more sharers), and every sharer both runs have keeps its LoRA, unless
        `sharer_train` differs (e.g. DP-SGD): then every sharer trains again. Reused files are linked, not
        copied; their recorded seconds come along."""
        check_later_steps(self.config, config, also=SELECTION_STEP + ("sharer_train",))
        retrain = config.sharer_train != self.config.sharer_train
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
                                      if s.user_id in mine and not retrain for f in ("adapter", "lora.json")]
        for src, dst in links:
            link(self.folder / src, new.folder / dst)
        if not reselect and not retrain:
            self._lend_pool(new)
        return new

    def _lend_pool(self, new: "Run") -> None:
        """Copy into `new` a pool of this run's (its own, or one of `keys/`) built with the same piece settings,
        with the sharers' step-3 files: the same sharers with the same keys make the same pool."""
        same = ("key", "key_noise", "key_clip", "key_delta", "share_ratio", "gate_train", "max_len", "retrieval_copies",
                "device")
        for donor in [self, *(Run(f.parent) for f in sorted((self.folder / "keys").glob("*/run.json")))]:
            if (all(getattr(donor.config, k) == getattr(new.config, k) for k in same)
                    and donor.config.assembly.batch_size == new.config.assembly.batch_size
                    and (donor.pool_path / "pool.sqlite").exists() and not new.pool_path.exists()):
                for s in new.select():
                    for name in ("pieces.safetensors", "pieces.json", "stats.json"):
                        if (donor.sharer_dir(s.user_id) / name).exists():
                            shutil.copy(donor.sharer_dir(s.user_id) / name, new.sharer_dir(s.user_id) / name)
                shutil.copytree(donor.pool_path, new.pool_path)
                new.record("build_pool", donor.stats()["build_pool"])
                return

    @cached_property
    def merged(self):
        """(model, tokenizer) of the task-adapted base (step 0 done first), loaded once per process."""
        self.task_adapt()
        return load_base(self.merged_path, device=self.device)

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
        return self.selection()

    # --- steps 2-4 ---

    @writes
    def build_pool(self, executor=None) -> Pool:
        """Steps 2-3 for each sharer (`sharer_pieces`: here, or as tasks on an `executor.map`, e.g. Ray
        workers), then step 4 here, in sharer order: every executor builds the same pool."""
        c = self.config
        pool = Pool.open(self.pool_path, self.merged_fingerprint) if (self.pool_path / "pool.sqlite").exists() else None
        selection = self.select()
        if not selection:
            raise ValueError(f"{self.folder / 'selection.json'}: no sharer was selected (every cluster skipped? "
                             "lower min_sharer_items or use another selection strategy)")
        todo = [s.user_id for s in selection
                if not ((self.sharer_dir(s.user_id) / "stats.json").exists()
                        and pool is not None and pool.pseudonym(s.user_id) in pool.sharers())]
        results = (map(self.sharer_pieces, tqdm(todo, desc="steps 2-4: sharers")) if executor is None
                   else executor.map(partial(sharer_task, str(self.folder)), todo, desc="steps 2-4: sharers"))
        for stats, user_id in zip(results, todo):  # results first: the progress bar runs to its end
            pieces = load_pieces(self.sharer_dir(user_id) / "pieces.safetensors")
            if pool is None:
                shapes = {pos: (A.shape[1], B.shape[0]) for pos, (A, B, _) in pieces.items()}
                noise = key_privacy(c.key_noise, c.key_clip, c.key_delta, len(shapes)) if c.key_noise else None
                sgd = lora_privacy(c.sharer_train, [self.training_items(s.user_id) for s in selection]) \
                    if c.sharer_train.dp_noise else None
                pool = Pool.create(self.pool_path, self.merged_fingerprint, c.lora.model_dump(), shapes,
                                   seed=c.seed, sharing_ratio=c.share_ratio, key=c.key, key_privacy=noise,
                                   lora_privacy=sgd)
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
        save_pieces(folder / "pieces.safetensors",
                    {pos: (A, B, keys[pos]) for pos, (A, B) in lora_state(peft_model).items()})
        peft_model.unload()
        stats = {"lora": lora_stats, "keys": key_stats, "examples": len(examples)}
        write_json(folder / "pieces.json", stats)
        return stats

    def training_items(self, user_id: str) -> int:
        """How many history items the sharer's LoRA trains on (the rest are held out to stop on)."""
        return len(split_heldout(self.data.user(user_id).history, self.config.training("sharer_train", user_id))[0])

    def sharer_lora(self, user_id: str, model):
        """Step 2: the sharer's own LoRA, trained once and kept (a pool rebuilt with other keys reuses it)."""
        return load_or_train(model, self.sharer_dir(user_id), lambda: train_user_lora(
            self, self.data.user(user_id), desc=f"sharer {user_id}: LoRA"), stats_name="lora.json")

    def piece_keys(self, user_id: str, peft_model, examples: list, pad_id: int) -> tuple[dict, dict]:
        """Step 3: each piece's key - its gate trained with the LoRA frozen (the paper), or the
        sharer's mean activation at its position over its own history with its LoRA on (`key=activation`)
        or off (`key=task-activation`: what the history looks like to the task model, not to its own LoRA)."""
        if self.config.key == "gate":
            return train_gates(peft_model, examples, self.config.training("gate_train", user_id), pad_id,
                               desc=f"sharer {user_id}: gates")
        c, t0 = self.config, time.perf_counter()
        with peft_model.disable_adapter() if c.key == "task-activation" else nullcontext():
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

    def key_run(self, key: str) -> "Run":
        """The run whose pool has keys of kind `key`: this one, or one derived into RUN/keys/<key> (built on
        first use: gates trained, the same sharer LoRAs linked)."""
        if key == self.config.key:
            return self
        folder = self.folder / "keys" / key
        run = Run(folder) if (folder / "run.json").exists() else \
            self.derive(folder, self.config.updated({"key": key, "calibration": {"enabled": False}}))
        if "merged" in self.__dict__:  # one model in memory: the derived run's task model is this one's, linked
            run.__dict__["merged"] = self.merged
        run.build_pool()
        return run

    def key_pool(self, key: str) -> Pool:
        return self.key_run(key).own_pool()

    def open_pool(self) -> Pool:
        """The pool the run's selection rule assembles from (with calibration on, the chosen rule's)."""
        return self.key_pool(self.rule.key)

    # --- calibration (after step 4) ---

    def calibrate(self, scored: dict | None = None) -> dict | None:
        """Choose the selection rule on validation users (`calibration.calibrate`), once; None when it is off.
        `scored`: an earlier calibration on the same pool (a derived run's source's) whose predictions carry over."""
        if not self.config.calibration.enabled:
            return None
        if not self.calibration_path.exists():
            with self.writing():
                result = calibrate(self, scored)
                gate_seconds = sum(self.key_run(k).stats()["build_pool"]["gate_seconds"]
                                   for k in {self.config.updated(RULES[n]).key for n in result["grid"]
                                             if n not in result["cost"]["reused"]}
                                   if k != self.config.key)
                result["cost"]["other_key_pool_seconds"] = gate_seconds
                write_json(self.pool_path / "calibration.json",
                           {k: v for k, v in result.items() if k not in ("predictions", "losses", "golds")})
                write_json(self.calibration_path, result)
                self.record("calibrate", result["cost"])
        return read_json(self.calibration_path)

    @cached_property
    def rule(self) -> RunConfig:
        """The settings assembly uses: the run's own, with the rule calibration chose when it is on."""
        chosen = self.calibrate()
        return self.config if chosen is None else self.config.updated(chosen["rule"])

    # --- step 5 ---

    @writes
    def assemble(self, user_ids: list[str] | None = None, executor=None) -> dict[str, Recipe]:
        """A recipe for each target user (or the given users) from their own history; no training.
        With an `executor`, users are assembled in chunks, one per worker."""
        user_ids = self.split["targets"] if user_ids is None else user_ids
        todo = [u for u in user_ids if not self.recipe_path(u).exists()]
        if todo and self.rule.assembly.select == "neighbours":  # a fixed rule that reads the table: built once
            neighbour_table(self, run_validation_users(self), self.rule.assembly)
        if executor is None:
            self.merged  # loaded before the clock starts: users per hour is the steady rate
        t_all = time.perf_counter()
        if executor is None or not todo:
            seconds = assemble_users(self, todo)
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

    def assemble_history(self, user_id: str, history: list[Item], profile: str | None = None) -> Recipe:
        """The recipe of a user who need not be in the run's data (`run_assembly.assemble_history`)."""
        return assemble_history(self, user_id, history, profile)

    def export(self, user_id: str, out: str | Path, force: bool = False) -> Path:
        """The user's assembled PEFT as a standard peft adapter folder (`export.export_user`)."""
        return export_user(self, user_id, out, force)

    def export_base(self, out: str | Path) -> Path:
        """The merged, task-adapted base as a plain HF folder (step 0 done first; `export.export_base`)."""
        self.task_adapt()
        return export_base(self, out)

    def pipeline(self, executor=None) -> dict[str, Recipe]:
        self.task_adapt()
        self.select()
        self.build_pool(executor)
        self.calibrate()
        return self.assemble(executor=executor)
