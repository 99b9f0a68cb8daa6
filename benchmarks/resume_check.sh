#!/bin/bash
# An interrupted bench resumes at its rows: a --quick bench on synthetic data is killed once 5 rows are kept,
# run again into the same folder, and compared with the same bench run through once into another folder.
# Usage: benchmarks/resume_check.sh [OUT]   (a new folder; default runs/resume-check). About 30 min on one core.
set -u
OUT=${1:-runs/resume-check}
PERPCS=${PERPCS:-.venv/bin/perpcs}
if [ -e "$OUT" ]; then echo "error: $OUT exists; give a new folder" >&2; exit 2; fi
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PERPCS" data synth --kind classification --out "$OUT/data" --seed 0 > "$OUT/synth.log" 2>&1 || { cat "$OUT/synth.log"; exit 1; }
t0=$(date +%s)
"$PERPCS" bench --quick --data "$OUT/data" --out "$OUT/a" > "$OUT/a1.log" 2>&1 &
pid=$!
while [ "$(ls "$OUT/a/rows" 2>/dev/null | grep -vc costs)" -lt 5 ] && kill -0 $pid 2>/dev/null; do sleep 2; done
kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null; t1=$(date +%s)
echo "killed after $((t1 - t0)) s, rows kept: $(ls "$OUT/a/rows" | tr '\n' ' ')"
"$PERPCS" bench --quick --data "$OUT/data" --out "$OUT/a" > "$OUT/a2.log" 2>&1 || { tail "$OUT/a2.log"; exit 1; }
t2=$(date +%s)
echo "the same bench again: $((t2 - t1)) s, $(grep -ac 'kept from' "$OUT/a2.log") kept (costs and rows)"
"$PERPCS" bench --quick --data "$OUT/data" --out "$OUT/b" > "$OUT/b.log" 2>&1 || { tail "$OUT/b.log"; exit 1; }
t3=$(date +%s)
echo "the bench run through once: $((t3 - t2)) s"
same=0; total=0
for f in "$OUT"/b/preds/*.json; do
    total=$((total + 1)); cmp -s "$f" "$OUT/a/preds/$(basename "$f")" && same=$((same + 1)) || echo "different: $(basename "$f")"
done
echo "answers byte-identical for $same of $total rows; logs and both benches in $OUT"
[ "$same" -eq "$total" ]
