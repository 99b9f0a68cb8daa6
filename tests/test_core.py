"""Known-answer tests for the Per-Pcs core (training, gates, assembly, recipes) on tiny random Llamas.

Every expected value is computed here independently of the code under test: scores with plain
loops, weights with math.exp, deltas as sums of B_j @ A_j.
"""

import json
import math

import peft
import pytest
import torch

from conftest import tiny_llama
from perpcs.assembly import Assembler, activation_means, choose, piece_scores, predict_mask
from perpcs.data import Item
from perpcs.gates import Gates, train_gates
from perpcs.lora import lora_layers, lora_state, mix_pieces
from perpcs.pool import Pool
from perpcs.recipe import SERVED_RANKS, Recipe, apply_recipe, export_adapter, materialize, served_rank
from perpcs.settings import AssemblySettings, LoraSettings, RunConfig, TrainSettings
from perpcs.tasks import Task
from perpcs.training import (
    IGNORE,
    Example,
    add_lora,
    collate,
    example_losses,
    heldout_loss,
    history_examples,
    lm_loss,
    train_lora,
)

R, ALPHA = 2, 4.0
LORA = LoraSettings(r=R, alpha=ALPHA, dropout=0.0, target_modules=["q_proj", "v_proj"])
# tiny_llama: hidden 32, 4 heads of 8, 2 kv heads -> v_proj is 32 -> 16
POSITIONS = {f"model.layers.{i}.self_attn.{m}": (32, d_out)
             for i in range(2) for m, d_out in [("q_proj", 32), ("v_proj", 16)]}
L0 = [p for p in POSITIONS if ".layers.0." in p]
L1 = [p for p in POSITIONS if ".layers.1." in p]
TASK = Task(name="t", kind="generation", instruction="Title it.", input_name="In", output_name="Out")
# uneven lengths
HISTORY = [Item(input=f"note number {i} " + "x" * i, output=f"title {i}" + "z" * (2 * i)) for i in range(6)]
USERS = ["u0", "u1", "u2", "u3"]


def random_pieces(seed: int, positions=POSITIONS, scale: float = 0.3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {p: (scale * torch.randn(R, d_in, generator=g), scale * torch.randn(d_out, R, generator=g),
                torch.randn(d_in, generator=g)) for p, (d_in, d_out) in positions.items()}


@pytest.mark.parametrize("key", ["activation", "task-activation"])
def test_task_activation_keys_score_the_target_on_the_task_model(tmp_path, tokenizer, key):
    """With task-activation keys nothing is installed while scoring: every position's scores are those of the bare
    model's inputs there. With activation keys the layer-1 scores see the installed layer-0 pieces, so they differ
    (the check that this test can fail). The recipe's pieces are chosen either way."""
    pieces = {u: random_pieces(i, scale=3.0) for i, u in enumerate(USERS[:3])}
    pool = make_pool(tmp_path / "pool", pieces, key=key)
    seen, mask = bare_inputs(tokenizer)
    recipe, (trace,) = assemble(pool, tokenizer, top_k=2, batch_size=len(HISTORY))
    for p in POSITIONS:
        want = piece_scores(seen[p], torch.stack([pieces[u][p][2] for u in pieces]), mask, key)
        assert trace[p][0] == [pool.pseudonym(u) for u in pieces]
        if key == "task-activation" or p in L0:
            assert torch.allclose(trace[p][1], want, atol=1e-5)
        else:
            assert not torch.allclose(trace[p][1], want, atol=1e-3)
        assert len(recipe.pieces[p]) == 2


def bare_inputs(tokenizer) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({position: input}, predict mask) of a fresh tiny model over HISTORY in one batch, shortest first (as
    assembly orders a batch), with nothing installed."""
    bare, seen = tiny_llama(), {}
    handles = [bare.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: seen.__setitem__(p, a[0].clone()))
               for p in POSITIONS]
    examples = history_examples(TASK, tokenizer, HISTORY)
    inputs = collate(sorted(examples, key=lambda e: len(e.input_ids)), tokenizer.pad_token_id)
    mask = predict_mask(inputs.pop("labels"))
    with torch.no_grad():
        bare(**inputs)
    for h in handles:
        h.remove()
    return seen, mask


def make_pool(path, pieces: dict[str, dict], shares: dict[str, set] | None = None, fingerprint: str = "base-0",
              key: str = "gate") -> Pool:
    pool = Pool.create(path, fingerprint, lora_config=LORA.model_dump(), positions=POSITIONS, key=key)
    for user, p in pieces.items():
        pool.add_sharer(user, p, share=(shares or {}).get(user, set(POSITIONS)))
    return pool


def assemble(pool, tokenizer, history=HISTORY, **settings) -> tuple[Recipe, list]:
    """A recipe (and its trace) from a fresh tiny model, which comes back bitwise unchanged."""
    model = tiny_llama()
    before = snapshot(model)
    asm = Assembler(model, pool, AssemblySettings(**settings))
    trace: list = []
    recipe = asm.recipe(TASK, tokenizer, history, trace=trace)
    after = asm.unload().state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    return recipe, trace


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ln(v: torch.Tensor) -> torch.Tensor:
    """Layer norm without affine, written out (biased variance, eps 1e-5 as torch's default)."""
    mu = v.mean()
    return (v - mu) / torch.sqrt(((v - mu) ** 2).mean() + 1e-5)


def hand_scores(h: torch.Tensor, examples: list[Example], keys: list[torch.Tensor], key: str = "gate") -> list[float]:
    """Gate keys: s_j = mean over examples (with any) of mean over predicting tokens t of LN(h_t).LN(g_j)/sqrt(d).
    Activation keys: m = that same mean of LN(h_t); s_j = sqrt(d) cos(m - c, k_j - c), c = the mean key."""
    d = h.shape[-1]
    per_example = []
    for b, ex in enumerate(examples):
        tokens = [t for t in range(len(ex.labels) - 1) if ex.labels[t + 1] != IGNORE]
        if tokens:
            per_example.append([ln(h[b, t]) for t in tokens])
    if key == "gate":
        return [sum(sum(float(x @ ln(g)) for x in xs) / len(xs) for xs in per_example) / len(per_example) / math.sqrt(d)
                for g in keys]
    m = sum(sum(xs) / len(xs) for xs in per_example) / len(per_example)
    c = sum(keys) / len(keys)
    return [math.sqrt(d) * float((m - c) @ (k - c) / ((m - c).norm() * (k - c).norm())) for k in keys]


def test_lm_loss_equals_the_full_forward_loss_and_gradients(tokenizer):
    """Logits only at label-predicting positions give the same loss and LoRA gradients as the full forward,
    on a right-padded batch whose rows put their labels at different positions."""
    model = add_lora(tiny_llama(), LORA, seed=0)
    batch = collate(history_examples(TASK, tokenizer, HISTORY), tokenizer.pad_token_id)
    assert len({int((row != IGNORE).nonzero()[0]) for row in batch["labels"]}) > 1
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(**batch).loss
    g_full = torch.autograd.grad(full, params)
    kept = lm_loss(model, batch)
    g_kept = torch.autograd.grad(kept, params)
    assert torch.allclose(full, kept, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_full, g_kept))


def test_a_batch_scores_each_example_as_it_would_alone(tokenizer):
    """Right-padded rows of different lengths: each row's loss is its own example's, and heldout_loss is the same
    at any batch size."""
    model = add_lora(tiny_llama(), LORA, seed=0)
    examples = history_examples(TASK, tokenizer, HISTORY)
    assert len({len(e.input_ids) for e in examples}) > 1
    alone = torch.stack([lm_loss(model, collate([e], tokenizer.pad_token_id)) for e in examples]).detach()
    assert torch.allclose(example_losses(model, collate(examples, tokenizer.pad_token_id)).detach(), alone, atol=1e-5)
    for size in (1, 2, len(examples)):
        assert heldout_loss(model, examples, tokenizer.pad_token_id, size) == pytest.approx(float(alone.mean()),
                                                                                            abs=1e-5)


def test_lm_loss_falls_back_to_the_plain_forward_without_logits_to_keep(tokenizer):
    class NoKeep(torch.nn.Module):  # a causal LM whose forward knows no `logits_to_keep`
        def __init__(self):
            super().__init__()
            self.inner = tiny_llama()

        def forward(self, input_ids, attention_mask, labels):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    model = NoKeep()
    batch = collate(history_examples(TASK, tokenizer, HISTORY), tokenizer.pad_token_id)
    assert torch.allclose(lm_loss(model, batch), model(**batch).loss, atol=1e-6)
    each = [lm_loss(model, collate([e], tokenizer.pad_token_id)) for e in history_examples(TASK, tokenizer, HISTORY)]
    assert torch.allclose(example_losses(model, batch), torch.stack(each), atol=1e-5)


def test_activation_means_and_activation_key_scores(tokenizer):
    model = tiny_llama()
    examples = history_examples(TASK, tokenizer, HISTORY[:4])
    pos = L0[0]
    seen = []
    module = model.get_submodule(pos)
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    means = activation_means(model, {pos: module}, examples, tokenizer.pad_token_id, batch_size=4)
    handle.remove()
    h = seen[0]
    per_example = []
    for b, ex in enumerate(examples):  # mean LN(h) over predicting tokens, per example, then over examples
        tokens = [t for t in range(len(ex.labels) - 1) if ex.labels[t + 1] != IGNORE]
        per_example.append(torch.stack([ln(h[b, t]) for t in tokens]).mean(0))
    assert torch.allclose(means[pos], torch.stack(per_example).mean(0), atol=1e-5)
    keys = torch.randn(3, h.shape[-1], generator=torch.Generator().manual_seed(0))
    mask = predict_mask(collate(examples, tokenizer.pad_token_id)["labels"])
    got = piece_scores(h, keys, mask, "activation")
    assert torch.allclose(got, torch.tensor(hand_scores(h, examples, list(keys), "activation")), atol=1e-5)
    # a sharer whose key is this user's own mean activation scores the most possible, sqrt(d)
    keys[1] = means[pos]
    got = piece_scores(h, keys, mask, "activation")
    assert got.argmax() == 1 and got[1] <= math.sqrt(h.shape[-1]) + 1e-4
    two = torch.stack([means[pos], 2 * keys.mean(0) - means[pos]])  # mirror images around their mean
    assert torch.allclose(piece_scores(h, two, mask, "activation"), torch.tensor([1.0, -1.0]) * math.sqrt(h.shape[-1]),
                          atol=1e-4)
    # identical keys say nothing: every piece gets the same score
    same = piece_scores(h, keys[:1].repeat(3, 1), mask, "activation")
    assert torch.allclose(same, same[0].expand(3))


def test_predict_mask_marks_tokens_before_labels():
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, IGNORE], [IGNORE, 5, IGNORE, IGNORE, IGNORE]])
    assert predict_mask(labels).tolist() == [[False, True, True, False, False], [True, False, False, False, False]]


# 1. piece scores from the real module input

@pytest.mark.parametrize("key", ["gate", "activation"])
def test_piece_scores_match_hand_computation_and_trace(tmp_path, tokenizer, key):
    pieces = {u: random_pieces(i) for i, u in enumerate(USERS[:3])}
    pool = make_pool(tmp_path / "pool", pieces, key=key)
    asm = Assembler(tiny_llama(), pool, AssemblySettings(top_k=2, batch_size=3))
    examples = history_examples(TASK, tokenizer, HISTORY[:5])
    examples.append(Example(examples[0].input_ids[:9], [IGNORE] * 9))  # no label: left out of the mean
    watched = [L0[0], L1[1]]  # layer 0 q_proj (base input) and layer 1 v_proj (after assembled layer 0)
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in watched}
    handles = [asm.layers[p].register_forward_pre_hook(lambda m, a, p=p: seen[p].append(a[0].detach().clone()))
               for p in watched]
    trace: list = []
    asm.assemble(examples, tokenizer.pad_token_id, trace)
    for h in handles:
        h.remove()
    asm.unload()

    sids = [pool.pseudonym(u) for u in pieces]
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # the assembler batches by length
    batches = [ordered[:3], ordered[3:]]
    assert len(trace) == 2 and all(len(seen[p]) == 2 for p in watched)
    for b, batch in enumerate(batches):
        mask = predict_mask(collate(batch, tokenizer.pad_token_id)["labels"])
        for p in watched:
            h = seen[p][b]
            want = torch.tensor(hand_scores(h, batch, [pieces[u][p][2] for u in pieces], key))
            ids, traced = trace[b][p]
            assert ids == sids
            keys = torch.stack([pieces[u][p][2] for u in pieces])
            assert torch.allclose(piece_scores(h, keys, mask, key), want, atol=1e-5)
            assert torch.allclose(traced, want, atol=1e-5)


# 2. selection and mixing

def test_choose_topk_softmax_weights():
    scores = torch.tensor([0.1, 0.5, -0.2, 0.4, 0.45])
    idx, w = choose(scores, AssemblySettings(top_k=3, temperature=0.5), torch.Generator())
    assert idx.tolist() == [1, 4, 3]
    e = [math.exp(s / 0.5) for s in (0.5, 0.45, 0.4)]
    assert torch.allclose(w, torch.tensor([x / sum(e) for x in e]), atol=1e-6)
    idx, w = choose(scores[:2], AssemblySettings(top_k=5), torch.Generator())  # k > n: all of them
    assert idx.tolist() == [1, 0] and torch.allclose(w, torch.softmax(torch.tensor([0.5, 0.1]), 0))


def test_choose_sample_is_seeded_and_stays_in_sample_topk():
    scores = torch.tensor([0.3, -1.0, 0.9, 0.1, 0.7, -0.5])  # top 3: indices 2, 4, 0
    s = AssemblySettings(select="sample", top_k=2, sample_topk=3, temperature=2.0)
    draws = [choose(scores, s, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        idx, w = choose(scores, s, gen)
        assert len(idx) == 2 and len(set(idx.tolist())) == 2 and set(idx.tolist()) <= {0, 2, 4}
        e = [math.exp(scores[i].item() / 2.0) for i in idx]
        assert torch.allclose(w, torch.tensor([x / sum(e) for x in e]), atol=1e-6)
        seen |= set(idx.tolist())
    assert seen == {0, 2, 4}
    cold = AssemblySettings(select="sample", top_k=2, sample_topk=6, sample_temperature=0.02)
    assert sorted(choose(scores, cold, gen)[0].tolist()) == [2, 4]  # cold: the top-2 (others have p < 1e-8)


def test_choose_topp_smallest_set_reaching_p():
    probs = [0.15, 0.5, 0.05, 0.3]
    scores = torch.log(torch.tensor(probs))  # softmax(scores / 1) == probs
    for p, want in [(0.4, [1]), (0.7, [1, 3]), (0.9, [1, 3, 0]), (0.99, [1, 3, 0, 2])]:
        idx, w = choose(scores, AssemblySettings(select="topp", top_p=p, top_k=1), torch.Generator())
        assert idx.tolist() == want
        mass = sum(probs[i] for i in want)
        assert torch.allclose(w, torch.tensor([probs[i] / mass for i in want]), atol=1e-6)


def test_mix_pieces_linear_and_cat():
    g = torch.Generator().manual_seed(0)
    pieces = [(torch.randn(R, 5, generator=g), torch.randn(3, R, generator=g)) for _ in range(3)]
    w = [0.5, 0.3, 0.2]
    A, B = mix_pieces(pieces, w, "linear")
    for i in range(R):
        for j in range(5):
            assert abs(A[i, j].item() - sum(w[k] * pieces[k][0][i, j].item() for k in range(3))) < 1e-6
    for i in range(3):
        for j in range(R):
            assert abs(B[i, j].item() - sum(w[k] * pieces[k][1][i, j].item() for k in range(3))) < 1e-6
    A, B = mix_pieces(pieces[:2], w[:2], "cat", rank=3 * R)
    assert A.shape == (3 * R, 5) and B.shape == (3, 3 * R)
    assert not A[2 * R:].any() and not B[:, 2 * R:].any()  # zero padding up to the rank
    assert torch.allclose(B @ A, sum(wk * b @ a for (a, b), wk in zip(pieces[:2], w[:2])), atol=1e-5)


# 3. auto-regressive selection

def test_layer0_pieces_change_layer1_scores_only(tmp_path, tokenizer):
    pieces = {u: random_pieces(i) for i, u in enumerate(USERS[:3])}
    settings = dict(top_k=2, batch_size=16)
    pool_a = make_pool(tmp_path / "a", pieces)
    _, (trace_a,) = assemble(pool_a, tokenizer, **settings)

    # same gates everywhere, other A/B at layer 0
    other = {u: {p: (random_pieces(10 + i)[p][:2] + (pieces[u][p][2],)) if p in L0 else pieces[u][p] for p in POSITIONS}
             for i, u in enumerate(pieces)}
    _, (trace_b,) = assemble(make_pool(tmp_path / "b", other), tokenizer, **settings)
    for p in L0:
        assert torch.equal(trace_a[p][1], trace_b[p][1])
    for p in L1:
        assert not torch.allclose(trace_a[p][1], trace_b[p][1], atol=1e-3)

    # the sharer with the best layer-0 scores no longer shares its layer-0 pieces
    best = {u: sum(trace_a[p][1][k].item() for p in L0) for k, u in enumerate(pieces)}
    top = max(best, key=best.get)
    pool_c = make_pool(tmp_path / "c", pieces, shares={top: set(L1)})
    _, (trace_c,) = assemble(pool_c, tokenizer, **settings)
    keep = [k for k, u in enumerate(pieces) if u != top]
    for p in L0:
        assert trace_c[p][0] == [pool_c.pseudonym(u) for u in pieces if u != top]
        assert torch.equal(trace_c[p][1], trace_a[p][1][keep])
    for p in L1:
        assert len(trace_c[p][0]) == 3 and not torch.allclose(trace_a[p][1], trace_c[p][1], atol=1e-3)


# 4. what each training step changes

def test_lora_then_gate_training_change_only_their_parameters(tokenizer):
    examples = history_examples(TASK, tokenizer, HISTORY)
    model = tiny_llama()
    base = snapshot(model)
    fresh = lora_state(add_lora(tiny_llama(), LORA, seed=3))  # the init train_lora starts from
    settings = TrainSettings(lr=1e-2, steps=3, batch_size=3, seed=3)
    peft_model, stats = train_lora(model, examples, LORA, settings, tokenizer.pad_token_id)
    assert stats["steps"] == 3 and math.isfinite(stats["final_loss"])
    trained = lora_state(peft_model)
    assert list(trained) == list(POSITIONS)
    for p, (A, B) in trained.items():
        assert not fresh[p][1].any() and B.any()  # B starts at zero and learns
        assert not torch.equal(A, fresh[p][0])

    gates, _ = train_gates(peft_model, examples, settings, tokenizer.pad_token_id)
    assert list(gates) == list(POSITIONS) and all(g.shape == (32,) and g.any() for g in gates.values())
    after = lora_state(peft_model)
    assert all(torch.equal(after[p][0], trained[p][0]) and torch.equal(after[p][1], trained[p][1]) for p in POSITIONS)
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())  # flags restored
    assert not any(m.lora_dropout["default"]._forward_pre_hooks for m in lora_layers(peft_model).values())

    back = peft_model.unload()
    now = back.state_dict()
    assert now.keys() == base.keys()
    assert all(torch.equal(now[k], base[k]) for k in base)


def test_gate_hook_feeds_gated_input_to_lora_branch():
    peft_model = add_lora(tiny_llama(), LORA, seed=0)
    layer = lora_layers(peft_model)[L0[1]]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(16, R, generator=g))
    gates = Gates(peft_model)
    with torch.no_grad():
        gates.g[gates.positions.index(L0[1])].copy_(torch.randn(32, generator=g))
    x = torch.randn(2, 5, 32, generator=g)
    gv = gates.state()[L0[1]]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = layer.base_layer(x) + (ALPHA / R) * (x * torch.sigmoid(x @ gv).unsqueeze(-1)) @ A.T @ B.T
    with torch.no_grad():
        plain = layer(x)
        gates.attach()
        gated = layer(x)
        gates.detach()
        assert torch.allclose(gated, want, atol=1e-5) and not torch.allclose(gated, plain, atol=1e-3)
        assert torch.equal(layer(x), plain)


# 5. sharing ratio

@pytest.mark.parametrize("select", ["topk", "sample", "topp"])
def test_unshared_pieces_are_never_selected(tmp_path, tokenizer, select):
    shares = {"u0": {L0[0], L1[0]}, "u1": {L0[1], L1[1], L1[0]}, "u2": {L0[0], L0[1]}, "u3": {L1[1]}}
    pieces = {u: random_pieces(i) for i, u in enumerate(USERS)}
    pool = make_pool(tmp_path / "pool", pieces, shares)
    shared = {(pool.pseudonym(u), p) for u, ps in shares.items() for p in ps}
    recipe, trace = assemble(pool, tokenizer, top_k=4, batch_size=2, select=select, top_p=0.999, sample_topk=4)
    assert len(trace) == 3
    for p, chosen in recipe.pieces.items():
        assert chosen and all((sid, p) in shared for sid, _ in chosen)
        assert abs(sum(w for _, w in chosen) - 1) < 1e-5
        if select != "topp":  # top_k >= sharers: every sharer of the position is taken
            assert {sid for sid, _ in chosen} == {sid for sid, q in shared if q == p}


def test_position_no_sharer_shares_gets_no_update(tmp_path, tokenizer):
    uncovered = L1[1]
    shares = {u: set(POSITIONS) - {uncovered} for u in USERS[:2]}
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i) for i, u in enumerate(USERS[:2])}, shares)
    recipe, trace = assemble(pool, tokenizer, top_k=2)
    assert recipe.pieces[uncovered] == [] and trace[0][uncovered][0] == []
    A, B = materialize(recipe, pool)[uncovered]
    assert A.shape == (R, POSITIONS[uncovered][0]) and B.shape == (POSITIONS[uncovered][1], R)
    assert not A.any() and not B.any()
    assert all(recipe.pieces[p] for p in POSITIONS if p != uncovered)


# 6. recipes: export, reload, round trip

@pytest.mark.parametrize("mix", ["linear", "cat"])
def test_exported_adapter_matches_apply_recipe(tmp_path, tokenizer, mix):
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i) for i, u in enumerate(USERS[:3])})
    recipe, _ = assemble(pool, tokenizer, top_k=2, batch_size=4, mix=mix)
    recipe.save(tmp_path / "recipe.json")
    back = Recipe.load(tmp_path / "recipe.json")
    assert back == recipe and json.loads((tmp_path / "recipe.json").read_text())["pool_id"] == pool.pool_id

    folder = export_adapter(back, pool, tmp_path / "adapter")
    assert sorted(f.name for f in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == served_rank(recipe.rank()) in SERVED_RANKS and cfg["lora_alpha"] / cfg["r"] == ALPHA / R

    ids = collate(history_examples(TASK, tokenizer, HISTORY[:2]), tokenizer.pad_token_id)
    inputs = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    with torch.no_grad():
        base = tiny_llama()(**inputs).logits
        mem = apply_recipe(tiny_llama(), recipe, pool)(**inputs).logits
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), folder).eval()(**inputs).logits
    assert torch.allclose(mem, loaded, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(mem, base, atol=1e-3)


def test_recipe_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"pool_id": 1}')
    with pytest.raises(ValueError, match="bad.json: not a perpcs recipe"):
        Recipe.load(bad)
    other = Recipe(pool_id="p", base_fingerprint="b", lora=LORA.model_dump(), top_k=1, pieces={},
                   format="perpcs-recipe/9")
    other.save(bad)
    with pytest.raises(ValueError, match="recipe format"):
        Recipe.load(bad)


# 7. materialised deltas

def peft_delta(recipe: Recipe, pool, position: str) -> torch.Tensor:
    layer = lora_layers(apply_recipe(tiny_llama(), recipe, pool))[position]
    return layer.get_delta_weight("default")


@pytest.mark.parametrize("mix", ["cat", "linear"])
def test_materialized_delta_weights(tmp_path, mix):
    pieces = {u: random_pieces(i) for i, u in enumerate(USERS[:3])}
    pool = make_pool(tmp_path / "pool", pieces)
    sid = {u: pool.pseudonym(u) for u in pieces}
    chosen = {L0[0]: [("u0", 0.6), ("u1", 0.3), ("u2", 0.1)], L0[1]: [("u2", 1.0)],
              L1[0]: [("u1", 0.25), ("u0", 0.75)], L1[1]: [("u0", 0.5), ("u2", 0.5)]}
    recipe = Recipe(pool_id=pool.pool_id, base_fingerprint=pool.base_fingerprint, lora=pool.lora_config, mix=mix,
                    top_k=3, pieces={p: [(sid[u], w) for u, w in c] for p, c in chosen.items()})
    weights = materialize(recipe, pool)
    scaling = ALPHA / R
    for p, c in chosen.items():
        A, B = weights[p]
        if mix == "cat":
            assert recipe.rank() == 3 * R
            assert A.shape == (3 * R, POSITIONS[p][0]) and B.shape == (POSITIONS[p][1], 3 * R)
            want = sum(w * scaling * pieces[u][p][1] @ pieces[u][p][0] for u, w in c)
        else:
            want = scaling * sum(w * pieces[u][p][1] for u, w in c) @ sum(w * pieces[u][p][0] for u, w in c)
        assert torch.allclose(scaling * B @ A, want, atol=1e-5)
        assert torch.allclose(peft_delta(recipe, pool, p), want, atol=1e-5)  # what the model really adds


def test_assembler_installs_cat_mix_of_chosen_pieces(tmp_path, tokenizer):
    pieces = {u: random_pieces(i) for i, u in enumerate(USERS[:3])}
    pool = make_pool(tmp_path / "pool", pieces)
    s = AssemblySettings(top_k=2, mix="cat", temperature=0.7)
    asm = Assembler(tiny_llama(), pool, s)
    trace: list = []
    asm.assemble(history_examples(TASK, tokenizer, HISTORY), tokenizer.pad_token_id, trace)
    by_sid = {pool.pseudonym(u): u for u in pieces}
    for p in POSITIONS:
        ids, scores = trace[0][p]
        idx, w = choose(scores, s, torch.Generator())
        want = sum(wk * (ALPHA / R) * pieces[by_sid[ids[i]]][p][1] @ pieces[by_sid[ids[i]]][p][0]
                   for i, wk in zip(idx.tolist(), w.tolist()))
        assert torch.allclose(asm.layers[p].get_delta_weight("default"), want, atol=1e-5)
    asm.unload()


def test_a_recipe_naming_more_sharers_than_top_k_installs_as_apply_recipe_builds_it(tmp_path, tokenizer):
    """A recipe averages its history batches' picks: top-1 over 3 batches can name 3 sharers at a position. The
    working LoRA must hold them (it once had rank r * top_k, and calibration's act-cat-k64 crashed), and
    installing the recipe must give the model a target gets from it."""
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i) for i, u in enumerate(USERS)})
    asm = Assembler(tiny_llama(), pool, AssemblySettings(top_k=1, mix="cat", batch_size=2, recent_k=6))
    recipe = asm.recipe(TASK, tokenizer, HISTORY)
    assert max(len(chosen) for chosen in recipe.pieces.values()) > 1  # the case this is about
    asm.install_weights({p: dict(c) for p, c in recipe.pieces.items()}, recipe.strength)
    ids = collate(history_examples(TASK, tokenizer, HISTORY[:2]), tokenizer.pad_token_id)
    inputs = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    with torch.no_grad():
        installed = asm.model(**inputs).logits
        built = apply_recipe(tiny_llama(), recipe, pool)(**inputs).logits
    assert torch.allclose(installed, built, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampled_assembly_on_cuda_matches_cpu(tmp_path, tokenizer):
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i) for i, u in enumerate(USERS)})
    s = AssemblySettings(select="sample", top_k=2, sample_topk=3, batch_size=2)
    cpu, gpu = (Assembler(tiny_llama().to(d), pool, s).recipe(TASK, tokenizer, HISTORY) for d in ("cpu", "cuda"))
    for p, chosen in cpu.pieces.items():
        assert [sid for sid, _ in gpu.pieces[p]] == [sid for sid, _ in chosen]
        assert all(abs(w - v) < 1e-4 for (_, w), (_, v) in zip(chosen, gpu.pieces[p]))


# 8. refusals

def test_foreign_or_corrupted_pools_and_recipes_are_refused(tmp_path, tokenizer):
    pieces = {u: random_pieces(i) for i, u in enumerate(USERS[:2])}
    pool = make_pool(tmp_path / "pool", pieces)
    twin = make_pool(tmp_path / "twin", pieces)  # same base and pieces, but another pool
    recipe, _ = assemble(pool, tokenizer, top_k=1)
    pool.close()
    with pytest.raises(ValueError, match="built on base model 'base-0'"):
        Pool.open(tmp_path / "pool", base_fingerprint="base-1")
    pool = Pool.open(tmp_path / "pool", base_fingerprint="base-0")

    for fn in (lambda: materialize(recipe, twin), lambda: apply_recipe(tiny_llama(), recipe, twin),
               lambda: export_adapter(recipe, twin, tmp_path / "out"),
               lambda: materialize(recipe.model_copy(update={"base_fingerprint": "base-1"}), pool)):
        with pytest.raises(ValueError, match="recipe was assembled from pool"):
            fn()
    assert not (tmp_path / "out").exists()
    materialize(recipe, pool)  # its own pool is fine

    twin.close()
    victim = next((tmp_path / "twin" / "sharers").iterdir())
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 does not match"):
        Pool.open(tmp_path / "twin")
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        Pool.open(tmp_path / "twin")


def test_assembler_formats_history_as_the_run_does(tmp_path, tokenizer):
    pool = make_pool(tmp_path / "pool", {u: random_pieces(i) for i, u in enumerate(USERS)})
    asm = Assembler.for_run(tiny_llama(), pool, RunConfig(data="d", retrieval_copies=True, max_len=40, seed=5))
    examples = asm.examples(TASK, tokenizer, HISTORY)
    assert len(examples) == 2 * len(HISTORY) - 1 and max(len(e.input_ids) for e in examples) == 40
    recipe = asm.recipe(TASK, tokenizer, HISTORY)
    asm.unload()
    # a recipe records the assembly settings, then the history format and seed it was made with
    assert list(recipe.settings)[-3:] == ["retrieval_copies", "max_len", "seed"]
    assert (recipe.settings["retrieval_copies"], recipe.settings["max_len"], recipe.settings["seed"]) == (True, 40, 5)
