#!/bin/bash
# Copied into .gpu/tools by scripts/gpu/kit.sh; runs on the GPU host.
# Runs queue file $Q (lines NAME|EST_SECONDS|COMMAND; $B expands to the bench) while BUDGET seconds last.
# Each line's new files in $S go to $OUT/NAME*. Prints their table last (finqa_trl.report --bench).
: "${OUT:?job.sh is for the GPU host, where the device tool sets OUT}"
S=${S:-/tmp/q}; BUDGET=${BUDGET:-540}; start=$(date +%s); mkdir -p "$S"
export B="python3 -m finqa_trl.bench --data_dir ../shared/data/finqa-sample --tokenizer ../shared/models/llama-3-tokenizer --examples 96 --warmup_examples 32 --out $S --workdir /tmp/w0"
export PYTHONPATH=. PYTHONUNBUFFERED=1
echo "commit $(cat .gpu/tools/COMMIT) start $(date -u +%H:%M:%S)"
while IFS='|' read -r name est cmd; do
  case "$name" in ''|\#*) continue;; esac
  left=$(( BUDGET - ($(date +%s) - start) ))
  if [ "$left" -lt "$est" ]; then echo "SKIP $name (est $est s, left $left s)"; continue; fi
  echo "== $name (est $est s, left $left s) $(date -u +%H:%M:%S): $cmd"
  touch /tmp/.mark; t=$(date +%s)
  timeout "$left" bash -c "$cmd" > "$S/$name.log" 2>&1; rc=$?
  echo "   rc=$rc in $(( $(date +%s) - t )) s"; tail -4 "$S/$name.log" | sed 's/^/   /'
  for f in $(find "$S" -maxdepth 1 -newer /tmp/.mark -type f ! -name '*.log' ! -name '*.png'); do
    b=$(basename "$f"); case "$b" in bench-*-profile-*) cp "$f" "$OUT/$name-${b#*-profile-}";; bench-*.json) cp "$f" "$OUT/$name.json";; *) cp "$f" "$OUT/$name-$b";; esac
  done
  grep -E "Traceback|Error|error:" "$S/$name.log" | tail -3
done < "$Q"
cat "$S"/*.log > "$OUT/all.log" 2>/dev/null
# the project's own table of the call's files (source = file name), and the card and host under it
ls "$OUT"/*.json >/dev/null 2>&1 && python3 -m finqa_trl.report --plot none --bench "$OUT"/*.json
