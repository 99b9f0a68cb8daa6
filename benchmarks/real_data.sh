#!/usr/bin/env bash
# Imports the four public per-user data sets of ../shared/data (or DATA=...) and runs `perpcs bench`
# on each. Results: $OUT/<name>/results.{json,md}. Each bench takes about 10-20 minutes on 2 CPU cores.
# Usage: benchmarks/real_data.sh [name ...]   (names: studemo lastfm beauty papers; default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/real}
SEED=${SEED:-0}
P=.venv/bin/perpcs
# Long histories: assemble from the 64 most recent items (recent_k), as a target user would.
COMMON=(--seed "$SEED" --set assembly.recent_k=64)

run() {
  local name=$1
  case $name in
    studemo)
      $P data import annotator-csv "$DATA/studemo/text_data.csv.gz" "$DATA/studemo/annotation_data.csv" \
        --label valence --out "$OUT/data/studemo" --max-tokens 48 --queries 8 --seed "$SEED"
      $P bench --data "$OUT/data/studemo" --out "$OUT/studemo" --targets 4 --sharers 6 "${COMMON[@]}" ;;
    lastfm)
      $P data import lastfm-tags "$DATA/lastfm-hetrec2011" --out "$OUT/data/lastfm" \
        --max-users 48 --min-history 20 --queries 8 --seed "$SEED"
      $P bench --data "$OUT/data/lastfm" --out "$OUT/lastfm" --targets 4 --sharers 6 "${COMMON[@]}" ;;
    beauty)
      $P data import amazon-reviews "$DATA/amazon-reviews-2018/All_Beauty_5.json.gz" --target rating \
        --out "$OUT/data/beauty" --min-history 3 --max-tokens 64 --queries 1 --seed "$SEED"
      $P bench --data "$OUT/data/beauty" --out "$OUT/beauty" --targets 8 --sharers 6 --set min_sharer_items=3 "${COMMON[@]}" ;;
    papers)
      $P data import papers-jsonl "$DATA/mlanthology/mlanthology_subset_300authors.jsonl.gz" \
        --out "$OUT/data/papers" --max-users 48 --max-tokens 64 --queries 3 --seed "$SEED"
      $P bench --data "$OUT/data/papers" --out "$OUT/papers" --targets 4 --sharers 6 "${COMMON[@]}" ;;
    *) echo "unknown data set: $name (known: studemo lastfm beauty papers)" >&2; exit 2 ;;
  esac
}

for name in "${@:-studemo lastfm beauty papers}"; do
  for n in $name; do run "$n"; done
done
