#!/usr/bin/env bash
# vLLM vs perpcs on a GPU: serve a run's merged base with vLLM plus two exported user adapters and
# compare greedy outputs with perpcs's own (peft) generation on 20 prompts (10 per user).
# Without CUDA or without vllm it says so and exits 0 (skipped). Not yet run: no GPU was available
# when it was written.
#
#   benchmarks/gpu_check.sh RUN [MAX_NEW_TOKENS]     (needs `pip install vllm` on the GPU machine)
set -euo pipefail
RUN=${1:?usage: benchmarks/gpu_check.sh RUN [MAX_NEW_TOKENS]}
NEW=${2:-16}
PY=${PYTHON:-python}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device here: skipped"; exit 0
fi
if ! "$PY" -c 'import vllm' 2>/dev/null; then
    echo "gpu_check: vllm is not installed (pip install vllm): skipped"; exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -c "from perpcs.cli import app; app()" export-base --run "$RUN" --out "$WORK/base"
USERS=$("$PY" -c "from perpcs.pipeline import Run; print(' '.join(Run('$RUN').split['targets'][:2]))")
i=0
for U in $USERS; do
    "$PY" -c "from perpcs.cli import app; app()" export --run "$RUN" --user "$U" --out "$WORK/adapter$i"
    i=$((i + 1))
done

"$PY" - "$RUN" "$WORK" "$NEW" $USERS <<'PYEOF'
import json
import sys
from pathlib import Path

import torch
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

from perpcs.generation import generate
from perpcs.models import load_base
from perpcs.pipeline import Run
from perpcs.recipe import Recipe, apply_recipe

run_dir, work, new, users = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
run = Run(run_dir)
task = run.data.task
prompts = {u: [task.format_prompt(q.input) for q in run.data.user(u).queries][:10] for u in users}
adapters = {u: work / f"adapter{i}" for i, u in enumerate(users)}

# perpcs: the merged base with each recipe applied (peft), greedy, float32
ours = {}
for u in users:
    model, tok = load_base(work / "base", dtype=torch.float32, device="cuda")
    ours[u] = generate(apply_recipe(model, Recipe.load(run.recipe_path(u)), run.open_pool()), tok, prompts[u], new)
    del model
    torch.cuda.empty_cache()

# vLLM: the same base folder, each adapter as a LoRA request, greedy, float32
rank = max(json.loads((a / "adapter_config.json").read_text())["r"] for a in adapters.values())
llm = LLM(model=str(work / "base"), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=rank,
          gpu_memory_utilization=0.5, enforce_eager=True)
greedy = SamplingParams(temperature=0.0, max_tokens=new)
# token ids, not text: perpcs tokenizes without special tokens, vLLM's text path would add a BOS
ids = {u: [{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in prompts[u]] for u in users}
theirs = {u: [o.outputs[0].text for o in llm.generate(ids[u], greedy, lora_request=LoRARequest(u, i + 1, str(adapters[u])))]
          for i, u in enumerate(users)}

rows = [{"user": u, "prompt": p[-80:], "perpcs": a, "vllm": b, "same": a.strip() == b.strip()}
        for u in users for p, a, b in zip(prompts[u], ours[u], theirs[u])]
same = sum(r["same"] for r in rows)
# users' outputs should differ somewhere, else the check cannot tell adapters apart
distinct = ours[users[0]] != ours[users[1]] if len(users) == 2 else None
report = {"run": run_dir, "prompts": len(rows), "same": same, "max_new_tokens": new, "lora_rank": rank,
          "users_differ": distinct, "rows": rows}
out = Path("benchmarks/results/gpu-check.json")
out.write_text(json.dumps(report, indent=2) + "\n")
print(f"gpu_check: {same}/{len(rows)} greedy outputs identical (perpcs vs vLLM); wrote {out}")
sys.exit(0 if same >= 0.9 * len(rows) else 1)
PYEOF
