"""`perpcs privacy`: what a finished run's pool and recipes give away, measured by attacks.

Members are history items a model or key was made from; non-members are items of held-out users
(sharer candidates not selected: no model or key of the run ever read them). Each attack scores a
candidate item, higher meaning "member" (see `privacy_report` for AUROC, CI and TPR at 1% FPR):
- assembled_*: (a) a target's assembled PEFT on the items of the sharers its recipe gives weight,
  by minus its loss (PriME's `mia.py` attack) and calibrated, minus (its loss - the task model's loss);
- piece_*: (b) a sharer's LoRA as the pool holds it, on that sharer's training items, same scores;
- key_membership*: (c) how close an item's activation, under the sharer's own pieces, is to the
  sharer's key: the assembly score itself (gate pools) or cos(a - c, k - c) (activation pools, c the
  keys' mean), averaged over positions; calibrated, minus the item's mean score against the other keys;
- oppu_*: the target's OPPU adapter on the target's own training items: the reference leak;
- attribute: a sharer's dominant label from its keys alone, by the cosine of each centred key with
  the direction of each label (mean activation of held-out items with that label, centred).
Each attack has a reference, the same attack on a model or key that never saw the members: another
sharer's LoRA or key (the next in selection order), another target's OPPU, and for the assembled
PEFT the target's own OPPU (trained on the target's items only).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from perpcs.assembly import example_means, predict_mask
from perpcs.baselines import load_lora
from perpcs.data import Item, User
from perpcs.pipeline import Run, safe_name
from perpcs.privacy_report import privacy_plot, privacy_table, roc
from perpcs.recipe import Recipe, apply_lora, apply_recipe
from perpcs.training import IGNORE, TrainSettings, batches, collate, history_examples, split_heldout
from perpcs.utils import check_output_dir, read_json, write_json, write_text

OUTPUTS = {"privacy.json", "privacy.md", "privacy.png"}


class PrivacySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    members: int = Field(16, ge=2, description="training items drawn per member user (sharer or target)")
    nonmembers: int = Field(64, ge=2, description="items drawn from the held-out users, shared by every attack")
    targets: int = Field(3, ge=1, description="targets whose assembled PEFT and OPPU adapter are attacked")
    resamples: int = Field(1000, ge=100, description="bootstrap resamples of each AUROC")
    batch_size: int = Field(16, ge=1)
    seed: int = 0


def example_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's mean loss over its output tokens [B] (logits only where some row predicts one)."""
    labels = batch["labels"]
    keep = (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    target = labels[:, keep + 1]
    loss = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
    return loss.sum(1) / (target != IGNORE).sum(1).clamp(min=1)


@torch.no_grad()
def forward_items(model, examples: list, pad_id: int, batch_size: int, modules: dict | None = None,
                  reduce=None) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Per example: its loss, and at each module `reduce(position, mean LN(h) [B, d])` of its input."""
    device = next(model.parameters()).device
    losses, reduced = [], {pos: [] for pos in modules or {}}
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, device)
        mask = predict_mask(batch["labels"])

        def hook(pos):
            def fn(module, args):
                v = example_means(F.layer_norm(args[0].float(), (args[0].shape[-1],)), mask.to(args[0].device))
                reduced[pos].append(reduce(pos, v).cpu())
            return fn

        handles = [m.register_forward_pre_hook(hook(pos)) for pos, m in (modules or {}).items()]
        try:
            losses.append(example_losses(model, batch).cpu())
        finally:
            for h in handles:
                h.remove()
    return torch.cat(losses).numpy(), {pos: torch.cat(v) for pos, v in reduced.items()}


def key_scores(v: torch.Tensor, keys: torch.Tensor, kind: str) -> torch.Tensor:
    """Scores [B, S] of examples' mean LN(h) v [B, d] against keys [S, d], as assembly scores pieces:
    LN(g) . v / sqrt(d) for gates, cos(v - c, k - c) for activation keys (c: the keys' mean)."""
    if kind == "gate":
        return v @ F.layer_norm(keys, (keys.shape[-1],)).T / math.sqrt(v.shape[-1])
    c = keys.nanmean(0)
    return F.cosine_similarity((v - c).unsqueeze(1), (keys - c).unsqueeze(0), dim=-1)


def trained_items(items: list[Item], settings: TrainSettings, stats: dict, copies: bool = False) -> list[Item]:
    """The items a LoRA saw up to the epoch it kept: its seeded batch order (`training.batches`) replayed.
    With a step cap below the history's size, most items are never seen; they are no members."""
    n = len(items) + (max(len(items) - 1, 0) if copies else 0)  # retrieval copies follow the items, from the 2nd
    steps = stats["steps"]
    if "best_epoch" in stats:
        steps = min(steps, stats["best_epoch"] * math.ceil(n / settings.batch_size))
    seen = {j if j < len(items) else j - len(items) + 1
            for batch in batches(list(range(n)), settings.batch_size, steps, settings.seed) for j in batch}
    return [items[i] for i in sorted(seen)]


class Attacks:
    """The attacks on one run (its pool's keys, its sharers' pieces, its targets' recipes)."""

    def __init__(self, run: Run, settings: PrivacySettings, oppu_dir: Path | None = None):
        self.run, self.s = run, settings
        self.model, self.tok = run.merged
        self.task = run.data.task
        self.pool = run.open_pool()
        self.sharers = [s.user_id for s in run.select()]
        self.sids = [self.pool.pseudonym(u) for u in self.sharers]
        self.oppu_dir = oppu_dir if oppu_dir is not None else run.folder / "oppu"
        self.targets = [t for t in run.split["targets"] if (run.recipe_path(t)).exists()][: settings.targets]
        self.modules = {pos: self.model.get_submodule(pos) for pos in self.pool.positions}
        rng = random.Random(settings.seed)
        taken = set(self.sharers)
        held_out = [u for u in run.split["candidates"] if u not in taken]
        if not held_out:
            raise ValueError(f"{run.folder}: every sharer candidate is a sharer; no held-out user's items to "
                             "serve as non-members (use more users or fewer sharers)")
        pool_items = [it for u in run.users(held_out) for it in u.history]
        self.nonmember_items = rng.sample(pool_items, min(settings.nonmembers, len(pool_items)))
        self.n_nonmember_users = len(held_out)
        self.members = {u: self._member_items(run.data.user(u), rng) for u in self.sharers + self.targets}
        self.nonmembers = self.examples(self.nonmember_items)
        keys = [self.pool.sharer_keys(sid) for sid in self.sids]
        self.keys = {pos: torch.stack([k.get(pos, torch.full(self.pool.shapes[pos][:1], math.nan)) for k in keys])
                     for pos in self.pool.positions}  # [S, d], NaN where a sharer does not share the position

    def _member_items(self, user: User, rng: random.Random) -> list[Item]:
        """A seeded sample of the items the user's LoRA (sharer or OPPU) trained on."""
        settings = self.run.config.training("sharer_train", user.user_id)
        items, _ = split_heldout(user.history, settings)
        stats = (self.run.sharer_dir(user.user_id) / "lora.json" if user.user_id in self.sharers
                 else self.oppu_dir / safe_name(user.user_id) / "stats.json")
        if stats.exists():
            items = trained_items(items, settings, read_json(stats), self.run.config.retrieval_copies)
        return rng.sample(items, min(self.s.members, len(items)))

    def examples(self, items: list[Item]) -> list:
        return history_examples(self.task, self.tok, items, self.run.config.max_len)

    def losses(self, model, items: list[Item]) -> np.ndarray:
        return forward_items(model, self.examples(items), self.tok.pad_token_id, self.s.batch_size)[0]

    def with_lora(self, weights: dict | None = None, recipe: Recipe | None = None):
        if recipe is not None:
            return apply_recipe(self.model, recipe, self.pool)
        return apply_lora(self.model, self.pool.lora_config, int(self.pool.lora_config["r"]), weights)

    def run_all(self) -> dict:
        base = {u: self.losses(self.model, items) for u, items in self.members.items()}
        base_non = self.losses(self.model, self.nonmember_items)
        attacks = {**self.piece_and_key_attacks(base, base_non), **self.assembled_and_oppu(base, base_non)}
        return {"run": str(self.run.folder), "key": self.pool.key, "key_privacy": self.pool.key_privacy,
                "n_sharers": len(self.sharers), "n_targets": len(self.targets),
                "n_nonmember_items": len(self.nonmember_items), "n_nonmember_users": self.n_nonmember_users,
                "settings": self.s.model_dump(), "attacks": attacks, "attribute": self.attribute()}

    def _roc(self, pos, neg) -> dict:
        return roc(np.concatenate(pos), np.concatenate(neg), self.s.resamples, self.s.seed)

    def _pair(self, what: str, att: tuple, ref: tuple) -> dict:
        return {"what": what, "attack": self._roc(*att), "reference": self._roc(*ref)}

    def piece_and_key_attacks(self, base: dict, base_non: np.ndarray) -> dict:
        """(b) and (c): each sharer's pieces on its items, the next sharer's items and the non-members."""
        S, pad = len(self.sharers), self.tok.pad_token_id
        rows = {k: ([], []) for k in ("loss", "cal", "key", "keycal", "ref_loss", "ref_cal", "ref_key", "ref_keycal")}
        for i, u in enumerate(self.sharers):
            nxt = self.sharers[(i + 1) % S]
            peft = self.with_lora(self.pool.sharer_pieces(self.sids[i]))
            try:
                items = self.members[u] + self.members[nxt] + self.nonmember_items
                loss, red = forward_items(self.model, self.examples(items), pad, self.s.batch_size, self.modules,
                                          lambda pos, v: key_scores(v, self.keys[pos], self.pool.key))
            finally:
                peft.unload()
            scores = torch.stack(list(red.values())).nanmean(0).numpy()  # [n, S], mean over positions
            own = scores[:, i]
            others = np.nanmean(np.delete(scores, i, axis=1), axis=1) if S > 1 else np.zeros_like(own)
            base_all = np.concatenate([base[u], base[nxt], base_non])
            a, b = len(self.members[u]), len(self.members[u]) + len(self.members[nxt])
            parts = {"loss": -loss, "cal": base_all - loss, "key": own, "keycal": own - others}
            for name, v in parts.items():
                rows[name][0].append(v[:a])
                rows[name][1].append(v[b:])
                rows["ref_" + name][0].append(v[a:b])  # the next sharer's items: these pieces never saw them
                rows["ref_" + name][1].append(v[b:])
        what = "sharer's items vs held-out users' items; reference: the next sharer's items"
        return {"piece_loss": self._pair(what, rows["loss"], rows["ref_loss"]),
                "piece_calibrated": self._pair(what, rows["cal"], rows["ref_cal"]),
                "key_membership": self._pair(what, rows["key"], rows["ref_key"]),
                "key_membership_calibrated": self._pair(what, rows["keycal"], rows["ref_keycal"])}

    def assembled_and_oppu(self, base: dict, base_non: np.ndarray) -> dict:
        """(a) each target's assembled PEFT, and its OPPU adapter (the reference leak, and (a)'s reference)."""
        out_rows = {k: ([], []) for k in ("a_loss", "a_cal", "ar_loss", "ar_cal",
                                          "o_loss", "o_cal", "or_loss", "or_cal")}
        have_oppu = [t for t in self.targets if (self.oppu_dir / safe_name(t) / "adapter").exists()]
        for j, t in enumerate(self.targets):
            recipe = Recipe.load(self.run.recipe_path(t))
            weighted = {sid for chosen in recipe.pieces.values() for sid, w in chosen if w > 0}
            chosen = [u for u, sid in zip(self.sharers, self.sids) if sid in weighted]
            if not chosen:
                continue
            mem = [it for u in chosen for it in self.members[u]]
            mem_base = np.concatenate([base[u] for u in chosen])
            peft = self.with_lora(recipe=recipe)
            try:
                loss = self.losses(self.model, mem + self.nonmember_items)
            finally:
                peft.unload()
            n = len(mem)
            self._add(out_rows, "a", -loss[:n], -loss[n:], mem_base - loss[:n], base_non - loss[n:])
            if t not in have_oppu:
                continue
            nxt = have_oppu[(have_oppu.index(t) + 1) % len(have_oppu)]
            peft = self.with_lora(load_lora(self.oppu_dir / safe_name(t) / "adapter"))
            try:
                own = self.members[t] + (self.members[nxt] if nxt != t else [])
                loss = self.losses(self.model, own + mem + self.nonmember_items)
            finally:
                peft.unload()
            a, b = len(self.members[t]), len(own)
            own_base = np.concatenate([base[t]] + ([base[nxt]] if nxt != t else []))
            # (a)'s reference: the target's OPPU never saw the sharers' items
            self._add(out_rows, "ar", -loss[b:b + n], -loss[b + n:], mem_base - loss[b:b + n], base_non - loss[b + n:])
            self._add(out_rows, "o", -loss[:a], -loss[b + n:], own_base[:a] - loss[:a], base_non - loss[b + n:])
            if nxt != t:  # OPPU's reference: this OPPU on another target's items
                self._add(out_rows, "or", -loss[a:b], -loss[b + n:], own_base[a:] - loss[a:b], base_non - loss[b + n:])
        what_a = "items of sharers the recipe weighs vs held-out users' items; reference: the target's OPPU"
        what_o = "target's own items vs held-out users' items; reference: another target's OPPU"
        out = {"assembled_loss": self._pair(what_a, out_rows["a_loss"], out_rows["ar_loss"]) if have_oppu else
               {"what": what_a, "attack": self._roc(*out_rows["a_loss"])},
               "assembled_calibrated": self._pair(what_a, out_rows["a_cal"], out_rows["ar_cal"]) if have_oppu else
               {"what": what_a, "attack": self._roc(*out_rows["a_cal"])}}
        if have_oppu:
            for name, key in (("oppu_loss", "o_loss"), ("oppu_calibrated", "o_cal")):
                ref = out_rows["or" + key[1:]]
                out[name] = {"what": what_o, "attack": self._roc(*out_rows[key]),
                             **({"reference": self._roc(*ref)} if ref[0] else {})}
        return out

    @staticmethod
    def _add(rows: dict, prefix: str, loss_pos, loss_neg, cal_pos, cal_neg) -> None:
        for name, pos, neg in (("loss", loss_pos, loss_neg), ("cal", cal_pos, cal_neg)):
            rows[f"{prefix}_{name}"][0].append(pos)
            rows[f"{prefix}_{name}"][1].append(neg)

    def attribute(self) -> dict:
        """Each sharer's dominant label from its keys: cosine of the centred key with each label's direction."""
        labels = sorted({it.output for it in self.nonmember_items})
        counts = {y: sum(it.output == y for it in self.nonmember_items) for y in labels}
        labels = [y for y in labels if counts[y] >= 2]
        if self.task.kind == "generation" or len(labels) < 2:
            return {"skipped": "a generation task, or fewer than 2 labels with 2 held-out items each"}
        _, acts = forward_items(self.model, self.nonmembers, self.tok.pad_token_id, self.s.batch_size,
                                self.modules, lambda pos, v: v)
        which = torch.tensor([labels.index(it.output) if it.output in labels else -1 for it in self.nonmember_items])
        sims = []
        for pos, a in acts.items():
            mu = torch.stack([a[which == y].mean(0) for y in range(len(labels))])  # [L, d]
            k = self.keys[pos]
            sims.append(F.cosine_similarity((k - k.nanmean(0)).unsqueeze(1), (mu - mu.mean(0)).unsqueeze(0), dim=-1))
        score = torch.stack(sims).nanmean(0).numpy()  # [S, L]
        dominant = []
        for u in self.sharers:
            hist = [it.output for it in self.run.data.user(u).history]
            dominant.append(max(labels, key=lambda y: (hist.count(y), y)))
        truth = np.array([[y == d for y in labels] for d in dominant])
        prior = max(labels, key=lambda y: counts[y])
        return {"labels": len(labels), "sharers": len(self.sharers),
                "accuracy": float(np.mean([labels[i] == d for i, d in zip(score.argmax(1), dominant)])),
                "prior_accuracy": float(np.mean([d == prior for d in dominant])),
                "roc": roc(score[truth], score[~truth], self.s.resamples, self.s.seed)}


def privacy(run_dir: str | Path, out: str | Path, settings: PrivacySettings | None = None,
            oppu_dir: str | Path | None = None, force: bool = False) -> dict:
    """Run every attack on a finished run; write OUT/privacy.json, privacy.md and privacy.png."""
    run = Run(run_dir)
    out = Path(out)
    check_output_dir(out, OUTPUTS, (run.folder, Path(run.config.data)), force)
    if not run.pool_path.exists() or not any(run.recipe_path(t).exists() for t in run.split["targets"]):
        raise ValueError(f"{run.folder}: not a finished run (no pool or no recipes); finish it with `perpcs pipeline`")
    result = Attacks(run, settings or PrivacySettings(), Path(oppu_dir) if oppu_dir else None).run_all()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "privacy.json", result)
    write_text(out / "privacy.md", privacy_table(result))
    privacy_plot(result, out / "privacy.png")
    return result
