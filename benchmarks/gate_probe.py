"""Diagnostic: how much do the pool's gates tell latent groups apart, under several scoring rules?

For every user of a finished synthetic run (except the sharers) it runs the merged model once over
the user's newest history items, *without* any LoRA (non-auto-regressive, to compare rules fast),
and keeps the mean LN(h) at every piece position over three token sets: the tokens that predict
output tokens (the paper's rule), the output tokens only, and every token. The score of a gate is
then mean LN(h) . LN(g) / sqrt(d) (linear, so the mean of per-example means gives it exactly).
For each rule, with and without subtracting the population mean of the scores of each piece, it
reports the share of the top-k softmax weight that lands on sharers of the user's own group
(against the share random picking gives); `gate/pool` first subtracts the pool's mean gate at each
position, so that what all gates share cannot rank the pieces. As a yardstick it also scores with a
key that is not the method's: each sharer's own mean LN(h), centred. With `--gate-steps`, the sharers' gates are first
retrained (LoRA frozen, as in step 3) for that many steps, to see whether longer gate training helps.
Usage:

    python benchmarks/gate_probe.py RUN_PARENT [--items 16] [--gate-steps N --gate-lr LR]

RUN_PARENT is a bench output folder (with data/groups.json and run/).
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from module_inputs import module_inputs
from perpcs.assembly import example_means, predict_mask
from perpcs.pipeline import Run
from perpcs.training import IGNORE


@torch.no_grad()
def user_means(model, examples, positions, pad_id, batch_size=16):
    """{rule: [positions, d]} mean LN(h) per example, then over examples, for each token set."""
    sums: dict[str, dict[str, torch.Tensor]] = {r: {} for r in ("predict", "output", "all")}
    counts = dict.fromkeys(sums, 0)
    for labels, attention, seen in module_inputs(model, examples, positions, pad_id, batch_size):
        masks = {"predict": predict_mask(labels), "output": predict_mask(labels) & (labels != IGNORE),
                 "all": attention.bool()}
        for pos, h in seen.items():
            for rule, mask in masks.items():
                sums[rule][pos] = sums[rule].get(pos, 0) + example_means(h, mask).sum(0)
        for rule, mask in masks.items():
            counts[rule] += int(mask.any(1).sum())
    return {r: torch.stack([sums[r][p] / counts[r] for p in positions]) for r in sums}


def retrained_gates(run, model, tok, sharers, steps, lr):
    """{user: {position: g}}: each sharer's gates trained again on its own examples, LoRA frozen."""
    from peft import PeftModel

    from perpcs.gates import train_gates

    out = {}
    for u in sharers:
        peft_model = PeftModel.from_pretrained(model, run.sharer_dir(u) / "adapter")
        settings = run.config.training("gate_train", u).model_copy(update={"steps": steps, "lr": lr})
        out[u], _ = train_gates(peft_model, run.examples(run.data.user(u), tok), settings, tok.pad_token_id,
                                desc=f"gates {u}")
        model = peft_model.unload()
    return model, out


def main(parent: str, items: int, gate_steps: int | None, gate_lr: float) -> None:
    parent = Path(parent)
    groups = json.loads((parent / "data" / "groups.json").read_text())
    run = Run(parent / "run")
    model, tok = run.merged
    pool = run.open_pool()
    sharers = [s["user_id"] for s in json.loads((parent / "run" / "selection.json").read_text())]
    by_pseudonym = {pool.pseudonym(u): u for u in sharers}
    positions = pool.positions
    ids, G = zip(*(pool.keys(p) for p in positions))
    order = [by_pseudonym[s] for s in ids[0]]
    assert all(list(x) == list(ids[0]) for x in ids), "probe assumes every sharer shares every position"
    if gate_steps:
        model, new = retrained_gates(run, model, tok, order, gate_steps, gate_lr)
        G = [torch.stack([new[u][p] for u in order]) for p in positions]
    d = G[0].shape[1]
    gates = torch.stack([F.layer_norm(g.float(), (d,)) for g in G])  # [P, S, d]
    # the gates centred on their pool mean before LN: a gate's part that every sharer's gate shares
    # (and LN scales by 1/std of each gate) no longer ranks the pieces
    gates_pool = torch.stack([F.layer_norm(g.float() - g.float().mean(0), (d,)) for g in G])
    sharer_group = torch.tensor([groups[u] for u in order])
    users = [u for u in run.data.users if u.user_id not in sharers]
    means = {}
    for u in tqdm([run.data.user(s) for s in order] + users, desc="forward"):
        means[u.user_id] = user_means(model, _examples(run, u, tok, items), positions, tok.pad_token_id)
    user_group = torch.tensor([groups[u.user_id] for u in users])
    same = (user_group[:, None] == sharer_group[None, :]).float()  # [U, S]
    chance = same.mean(1).mean().item()
    k = run.config.assembly.top_k
    ceiling = (same.sum(1).clamp(max=k) / k).mean().item()  # top-k all from the own group, equal weights
    print(f"{len(users)} users, sharers {[(u, groups[u]) for u in order]}, top-{k}; "
          f"chance {chance:.3f}, ceiling with equal weights {ceiling:.3f}")
    out = {}
    for rule in ("predict", "output", "all"):
        H = torch.stack([means[u.user_id][rule] for u in users])  # [U, P, d]
        S = torch.einsum("upd,psd->ups", H, gates) / math.sqrt(d)  # [U, P, S]
        # "sharer mean" key: instead of the gate, the sharer's own mean LN(h), centred on the users' mean
        K = torch.stack([means[u][rule] for u in order], 1)  # [P, S, d]
        M = torch.einsum("upd,psd->ups", H - H.mean(0), K - H.mean(0)[:, None, :]) / math.sqrt(d)
        # the same, centred on the sharers' own mean: needs nothing but what is in the pool
        c = K.mean(1, keepdim=True)  # [P, 1, d]
        Mp = torch.einsum("upd,psd->ups", H - c.squeeze(1), K - c) / math.sqrt(d)
        Sp = torch.einsum("upd,psd->ups", H, gates_pool) / math.sqrt(d)
        scored = {"gate": S, "gate/pool": Sp, "sharer-mean": M, "sharer-mean/pool": Mp}
        for key, centred in (("gate", False), ("gate", True), ("gate/pool", False), ("sharer-mean", True),
                             ("sharer-mean/pool", False)):
            S = scored[key]
            s = S - S.mean(0, keepdim=True) if centred else S
            top = torch.topk(s, k, dim=-1)
            w = torch.zeros_like(s).scatter(-1, top.indices, torch.softmax(top.values, -1))
            share = (w * same[:, None, :]).sum(-1).mean().item()
            # spread of scores across users (same piece) vs across sharers (same user)
            spread_u, spread_s = s.std(0).mean().item(), s.std(2).mean().item()
            name = f"{rule}{'+centred' if centred else ''} {key}"
            out[name] = {"same_group_weight": share, "std_across_users": spread_u, "std_across_sharers": spread_s}
            print(f"{name:28s} same-group weight {share:.3f} (chance {chance:.3f})  "
                  f"std across users {spread_u:.3f}, across sharers {spread_s:.3f}")
    print(json.dumps(out))


def _examples(run, user, tok, items):
    from perpcs.training import history_examples

    return history_examples(run.data.task, tok, user.history[-items:], run.config.max_len,
                            run.config.retrieval_copies, user.profile)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parent")
    ap.add_argument("--items", type=int, default=16, help="newest history items per user")
    ap.add_argument("--gate-steps", type=int, default=None)
    ap.add_argument("--gate-lr", type=float, default=1e-2)
    a = ap.parse_args()
    main(a.parent, a.items, a.gate_steps, a.gate_lr)
