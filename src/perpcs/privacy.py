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
from perpcs.data import Item, User
from perpcs.lora import apply_lora, load_lora
from perpcs.pipeline import Run
from perpcs.privacy_report import privacy_plot, privacy_table, roc
from perpcs.recipe import Recipe, apply_recipe
from perpcs.runfolder import safe_name
from perpcs.settings import TrainSettings
from perpcs.training import batch_indices, collate, example_losses, history_examples, split_heldout
from perpcs.utils import check_output_dir, read_json, write_json, write_text

OUTPUTS = {"privacy.json", "privacy.md", "privacy.png"}
REF = {"": "ref", "cal": "ref_cal"}  # an attack's rows -> its reference's rows


class PrivacySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    members: int = Field(16, ge=2, description="training items drawn per member user (sharer or target)")
    nonmembers: int = Field(64, ge=2, description="items drawn from the held-out users, shared by every attack")
    targets: int = Field(3, ge=1, description="targets whose assembled PEFT and OPPU adapter are attacked")
    sharers: int | None = Field(None, ge=2, description="sharers whose pieces and keys are attacked, the first in "
                                "selection order (every key still scores): one forward pass per sharer; None: all")
    resamples: int = Field(1000, ge=100, description="bootstrap resamples of each AUROC")
    batch_size: int = Field(16, ge=1)
    seed: int = 0


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
    """The items a LoRA saw up to the epoch it kept: its seeded batch order (`training.batch_indices`) replayed.
    With a step cap below the history's size, most items are never seen; they are no members."""
    n = len(items) + (max(len(items) - 1, 0) if copies else 0)  # retrieval copies follow the items, from the 2nd
    steps = stats["steps"]
    if "best_epoch" in stats:
        steps = min(steps, stats["best_epoch"] * math.ceil(n / settings.batch_size))
    seen = {j if j < len(items) else j - len(items) + 1 for batch in batch_indices(n, settings, steps) for j in batch}
    return [items[i] for i in sorted(seen)]


class View:
    """One pool of the run's sharers, with its keys and recipes: the run's own, or a run derived from it with
    other step 3-5 settings (`Run.derive`: the same sharers and LoRAs, other keys, noise or assembly)."""

    def __init__(self, run: Run, sharers: list[str]):
        self.run, self.pool = run, run.open_pool()
        self.sids = [self.pool.pseudonym(u) for u in sharers]
        keys = [self.pool.sharer_keys(sid) for sid in self.sids]
        self.keys = {pos: torch.stack([k.get(pos, torch.full(self.pool.shapes[pos][:1], math.nan)) for k in keys])
                     for pos in self.pool.positions}  # [S, d], NaN where a sharer does not share the position


class Attacks:
    """The attacks on one run (its pool's keys, its sharers' pieces, its targets' recipes), and on `views`,
    runs derived from it (their keys and recipes; their pieces are the run's)."""

    def __init__(self, run: Run, settings: PrivacySettings, oppu_dir: Path | None = None,
                 views: dict[str, Run] | None = None, assembled_views: set[str] | None = None):
        self.run, self.s = run, settings
        self.model, self.tok = run.merged
        self.task = run.data.task
        self.sharers = [s.user_id for s in run.select()]
        self.attacked = self.sharers[: settings.sharers]
        self.assembled_views = assembled_views
        self.views = {"": View(run, self.sharers)}
        for name, vrun in (views or {}).items():
            same = [s.user_id for s in vrun.select()] == self.sharers and all(
                (vrun.sharer_dir(u) / "adapter").resolve() == (run.sharer_dir(u) / "adapter").resolve()
                for u in self.sharers)
            if not same:
                raise ValueError(f"view {name}: {vrun.folder} is not derived from {run.folder} with its sharers "
                                 "and their LoRAs (make it with Run.derive or a bench --variant)")
            self.views[name] = View(vrun, self.sharers)
        self.pool = self.views[""].pool
        self.sids = self.views[""].sids
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
        self.members = {u: self._member_items(run.data.user(u), rng) for u in self.attacked + self.targets}

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

    def user_losses(self, users: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Under the model as it is now: the losses of each user's member items, and of the non-members."""
        items = [it for u in users for it in self.members[u]] + self.nonmember_items
        loss = forward_items(self.model, self.examples(items), self.tok.pad_token_id, self.s.batch_size)[0]
        out, i = {}, 0
        for u in users:
            out[u], i = loss[i : i + len(self.members[u])], i + len(self.members[u])
        return out, loss[i:]

    def with_lora(self, weights: dict):
        return apply_lora(self.model, self.pool.lora_config, int(self.pool.lora_config["r"]), weights)

    def run_all(self) -> dict:
        self.base, self.base_non = self.user_losses(self.attacked + self.targets)
        self.oppu = self.oppu_losses()
        keys = self.piece_and_key_attacks()
        acts = self.label_activations()
        results = {}
        for name, view in self.views.items():
            assembled = self.assembled(view) if not name or self.assembled_views is None or \
                name in self.assembled_views else {}
            results[name] = {"run": str(view.run.folder), "key": view.pool.key, "key_privacy": view.pool.key_privacy,
                             "attacks": {**keys[name], **assembled},
                             "attribute": self.attribute(view, acts)}
        main = results.pop("")
        main["attacks"] = {**main["attacks"], **keys["pieces"], **self.oppu_attacks()}
        return {**main, "lora_privacy": self.pool.lora_privacy, "n_sharers": len(self.sharers),
                "n_attacked_sharers": len(self.attacked),
                "n_targets": len(self.targets),
                "n_nonmember_items": len(self.nonmember_items), "n_nonmember_users": self.n_nonmember_users,
                "settings": self.s.model_dump(), **({"views": results} if results else {})}

    def _roc(self, pos, neg) -> dict:
        """(NaN where no target weighs an attacked sharer: nothing to attack.)"""
        cat = [np.concatenate(x) if x else np.array([]) for x in (pos, neg)]
        return roc(*cat, self.s.resamples, self.s.seed)

    def _pair(self, what: str, att: tuple, ref: tuple | None = None) -> dict:
        return {"what": what, "attack": self._roc(*att), **({"reference": self._roc(*ref)} if ref and ref[0] else {})}

    def piece_and_key_attacks(self) -> dict:
        """(b) and (c): each sharer's pieces on its items, the next sharer's items and the non-members;
        the key scores against every view's keys from the same forward pass."""
        S, pad, names = len(self.sharers), self.tok.pad_token_id, list(self.views)
        A = len(self.attacked)
        rows = {(v, k): ([], []) for v in names + ["pieces"] for k in ("", "cal", "ref", "ref_cal")}

        def reduce(pos, v):  # [B, views, S]
            return torch.stack([key_scores(v, view.keys[pos], view.pool.key) for view in self.views.values()], 1)

        for i, u in enumerate(self.attacked):
            nxt = self.attacked[(i + 1) % A]
            sid = self.sids[i]  # the pieces it shares, as the pool holds them
            shared = [p for p in self.pool.positions if sid in self.pool.candidates(p)]
            peft = self.with_lora({p: self.pool.piece(sid, p) for p in shared})
            try:
                items = self.members[u] + self.members[nxt] + self.nonmember_items
                loss, red = forward_items(self.model, self.examples(items), pad, self.s.batch_size, self.modules,
                                          reduce)
            finally:
                peft.unload()
            scores = torch.stack(list(red.values())).nanmean(0).numpy()  # [n, views, S], mean over positions
            a, b = len(self.members[u]), len(self.members[u]) + len(self.members[nxt])
            base_all = np.concatenate([self.base[u], self.base[nxt], self.base_non])
            parts = {("pieces", ""): -loss, ("pieces", "cal"): base_all - loss}
            for j, name in enumerate(names):
                own = scores[:, j, i]
                others = np.nanmean(np.delete(scores[:, j], i, axis=1), axis=1) if S > 1 else np.zeros_like(own)
                parts[(name, "")], parts[(name, "cal")] = own, own - others
            for (name, kind), v in parts.items():
                rows[(name, kind)][0].append(v[:a])
                rows[(name, kind)][1].append(v[b:])
                rows[(name, REF[kind])][0].append(v[a:b])  # the next sharer's items: never seen by these
                rows[(name, REF[kind])][1].append(v[b:])
        what = "sharer's items vs held-out users' items; reference: the next sharer's items"

        def pair(name, kind):
            return self._pair(what, rows[(name, kind)], rows[(name, REF[kind])])

        out = {name: {"key_membership": pair(name, ""), "key_membership_calibrated": pair(name, "cal")}
               for name in names}
        out["pieces"] = {"piece_loss": pair("pieces", ""), "piece_calibrated": pair("pieces", "cal")}
        return out

    def oppu_losses(self) -> dict:
        """Under each target's OPPU adapter: the losses of every sharer's, its own and the next target's items."""
        have = [t for t in self.targets if (self.oppu_dir / safe_name(t) / "adapter").exists()]
        out = {}
        for t in have:
            nxt = have[(have.index(t) + 1) % len(have)]
            peft = self.with_lora(load_lora(self.oppu_dir / safe_name(t) / "adapter"))
            try:
                out[t] = (nxt, *self.user_losses(self.attacked + list(dict.fromkeys([t, nxt]))))
            finally:
                peft.unload()
        return out

    def _rows(self, pos_users: list[str], losses: dict, non: np.ndarray, rows: dict, prefix: str) -> None:
        rows[prefix][0].append(-np.concatenate([losses[u] for u in pos_users]))
        rows[prefix][1].append(-non)
        rows[prefix + "_cal"][0].append(np.concatenate([self.base[u] - losses[u] for u in pos_users]))
        rows[prefix + "_cal"][1].append(self.base_non - non)

    def assembled(self, view: View) -> dict:
        """(a) each target's assembled PEFT on the items of the sharers its recipe weighs; reference: its OPPU."""
        rows = {k: ([], []) for k in ("a", "a_cal", "r", "r_cal")}
        for t in self.targets:
            recipe = Recipe.load(view.run.recipe_path(t))
            weighted = {sid for chosen in recipe.pieces.values() for sid, w in chosen if w > 0}
            chosen = [u for u, sid in zip(self.sharers, view.sids) if sid in weighted and u in self.members]
            if not chosen:
                continue
            peft = apply_recipe(self.model, recipe, view.pool)
            try:
                losses, non = self.user_losses(chosen)
            finally:
                peft.unload()
            self._rows(chosen, losses, non, rows, "a")
            if t in self.oppu:  # the target's OPPU never saw the sharers' items
                self._rows(chosen, self.oppu[t][1], self.oppu[t][2], rows, "r")
        what = "items of sharers the recipe weighs vs held-out users' items; reference: the target's OPPU"
        return {"assembled_loss": self._pair(what, rows["a"], rows["r"]),
                "assembled_calibrated": self._pair(what, rows["a_cal"], rows["r_cal"])}

    def oppu_attacks(self) -> dict:
        """The reference leak: each target's OPPU on its own items; reference: another target's OPPU on them."""
        if not self.oppu:
            return {}
        rows = {k: ([], []) for k in ("o", "o_cal", "r", "r_cal")}
        for t, (nxt, losses, non) in self.oppu.items():
            self._rows([t], losses, non, rows, "o")
            if nxt != t:
                self._rows([nxt], losses, non, rows, "r")
        what = "target's own items vs held-out users' items; reference: another target's OPPU"
        return {"oppu_loss": self._pair(what, rows["o"], rows["r"]),
                "oppu_calibrated": self._pair(what, rows["o_cal"], rows["r_cal"])}

    def label_activations(self) -> tuple[list[str], dict, torch.Tensor] | None:
        """The task model's mean LN(h) of the held-out items at every position, and their labels."""
        labels = sorted({it.output for it in self.nonmember_items})
        labels = [y for y in labels if sum(it.output == y for it in self.nonmember_items) >= 2]
        if self.task.kind == "generation" or len(labels) < 2:
            return None
        _, acts = forward_items(self.model, self.examples(self.nonmember_items), self.tok.pad_token_id,
                                self.s.batch_size, self.modules, lambda pos, v: v)
        which = torch.tensor([labels.index(it.output) if it.output in labels else -1 for it in self.nonmember_items])
        return labels, acts, which

    def attribute(self, view: View, label_acts) -> dict:
        """Each sharer's dominant label from its keys: cosine of the centred key with each label's direction."""
        if label_acts is None:
            return {"skipped": "a generation task, or fewer than 2 labels with 2 held-out items each"}
        labels, acts, which = label_acts
        sims = []
        for pos, a in acts.items():
            mu = torch.stack([a[which == y].mean(0) for y in range(len(labels))])  # [L, d]
            k = view.keys[pos]
            sims.append(F.cosine_similarity((k - k.nanmean(0)).unsqueeze(1), (mu - mu.mean(0)).unsqueeze(0), dim=-1))
        score = torch.stack(sims).nanmean(0).numpy()  # [S, L]
        dominant = []
        for u in self.sharers:
            hist = [it.output for it in self.run.data.user(u).history]
            dominant.append(max(labels, key=lambda y: (hist.count(y), y)))
        truth = np.array([[y == d for y in labels] for d in dominant])
        prior = max(labels, key=lambda y: (int((which == labels.index(y)).sum()), y))
        return {"labels": len(labels), "sharers": len(self.sharers),
                "accuracy": float(np.mean([labels[i] == d for i, d in zip(score.argmax(1), dominant)])),
                "prior_accuracy": float(np.mean([d == prior for d in dominant])),
                "roc": roc(score[truth], score[~truth], self.s.resamples, self.s.seed)}


def privacy(run_dir: str | Path, out: str | Path, settings: PrivacySettings | None = None,
            oppu_dir: str | Path | None = None, force: bool = False, views: dict[str, str | Path] | None = None,
            assembled_views: set[str] | None = None) -> dict:
    """Run every attack on a finished run (and the key and assembly attacks on `views`, runs derived from
    it); write OUT/privacy.json, privacy.md and privacy.png."""
    run = Run(run_dir)
    out = Path(out)
    check_output_dir(out, OUTPUTS, (run.folder, Path(run.config.data)), force)
    if not run.pool_path.exists() or not any(run.recipe_path(t).exists() for t in run.split["targets"]):
        raise ValueError(f"{run.folder}: not a finished run (no pool or no recipes); finish it with `perpcs pipeline`")
    views = {name: Run(folder) for name, folder in (views or {}).items()}
    result = Attacks(run, settings or PrivacySettings(), Path(oppu_dir) if oppu_dir else None, views,
                     assembled_views).run_all()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "privacy.json", result)
    write_text(out / "privacy.md", privacy_table(result))
    privacy_plot(result, out / "privacy.png")
    return result
