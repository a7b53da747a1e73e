#!/usr/bin/env bash
# Same-call A/B of decode speed on the GPU machine: the engine as at a git revision ("old") against
# the working tree ("new"), both built here, then generation_bench run old, new, old, new, ... on
# one machine and one model. Changes of a few percent are within the spread between machines of
# one kind (about 3%), so this is how they are judged.
#
#   bash bench/prepare_ab.sh REV        (here: writes .device-ab/, the files that differ)
#   run(command="bash bench/run_generation_ab_on_device.sh",
#       carry=[".device-debs-engine", ".device-python", ".device-ab"])
#
# env: AB_ROUNDS (default 2), AB_ARGS (generation_bench flags; default batch 1 and 32, no adapter
# and 4 mixed adapters, repetition penalty 1.3, the time to first token of a 2,048-token prompt
# alone and beside 31 decoding requests), BENCH_DATE, BENCH_SHAPE (default 8b).
# The first round of each side also runs generation_bench's checks (graph replay vs eager, the GPU
# sampler vs its CPU reference).
# AB_FLAGS="OLD_FLAGS|NEW_FLAGS": instead of two builds, one build of the working tree run with
# OLD_FLAGS as "old" and NEW_FLAGS as "new" (e.g. "--fused_layer_ops=0|--fused_layer_ops=1": a
# switch of the working tree measured off and on; no .device-ab needed). bench/ keeps the working
# tree's files for both builds (the same measuring code, and a script is never rewritten while it
# runs); the rest of the tree is swapped.
# Writes $OUT/<date>-<device>-generation-<shape>-ab.txt and the two build logs. Never asserts a timing.
set -uo pipefail
OUT=${OUT:-/tmp/lorad-generation-ab-out}
DATE=${BENCH_DATE:-$(date +%F)}
SHAPE=${BENCH_SHAPE:-8b}
ROUNDS=${AB_ROUNDS:-2}
ARGS=${AB_ARGS:---batches=1,32 --adapters=4 --adapter_cases=0,4 --repetition_penalty=1.3 --ttft_prompt_tokens=2048 --arrival=31:2048 --kv_cache_mib=8192}
FLAGS_OLD=${AB_FLAGS:-}; FLAGS_OLD=${FLAGS_OLD%%|*}
FLAGS_NEW=${AB_FLAGS:-}; FLAGS_NEW=${FLAGS_NEW#*|}
mkdir -p "$OUT"
source bench/device_build.sh
if [ -n "${AB_FLAGS:-}" ]; then
  MODEL=$WORK/model-$SHAPE
  mkdir -p "$AB" && echo "flags: old = $FLAGS_OLD, new = $FLAGS_NEW (one build)" > "$AB/rev.txt"
else
  ab_start
fi
RESULT=$OUT/$DATE-$DEVICE_TAG-generation-$SHAPE-ab.txt

log "model ($SHAPE)"
make_model &
MODEL_PID=$!
if [ -n "${AB_FLAGS:-}" ]; then
  build_and_report "$OUT/build-new.log" generation_bench
  NEW_RC=$BUILD_RC
  OLD_RC=$BUILD_RC
  cp "$BUILD/generation_bench" /tmp/generation_bench-new 2> /dev/null
  cp "$BUILD/generation_bench" /tmp/generation_bench-old 2> /dev/null
else
  build_both_sides generation_bench
fi
wait $MODEL_PID
log "model: $(tail -1 "$OUT/model.log")"

{
  ab_header Generation
  echo "# generation_bench $ARGS"
  echo
} > "$RESULT"
if [ "$NEW_RC" = 0 ] && [ "$OLD_RC" = 0 ]; then
  for round in $(seq 1 "$ROUNDS"); do
    for side in old new; do
      checks=0
      [ "$round" = 1 ] && checks=1
      flags=""
      [ -n "${AB_FLAGS:-}" ] && { [ "$side" = old ] && flags=$FLAGS_OLD || flags=$FLAGS_NEW; }
      echo "== $side, round $round" >> "$RESULT"
      # shellcheck disable=SC2086
      timeout 200 /tmp/generation_bench-$side --model="$MODEL" $ARGS $flags --verify_graphs=$checks \
        --variant="$side" 2>&1 | grep -E "RESULT|identical|failed|rror" >> "$RESULT" ||
        echo "!! exit ${PIPESTATUS[0]}" >> "$RESULT"
      log "$side round $round done"
    done
  done
  # Decode tokens/s per case: each round's old and new, and new / old of the means.
  "$PY" - "$RESULT" >> "$RESULT" << 'PYEOF'
import re, sys, collections
runs = collections.defaultdict(lambda: {"old": [], "new": []})
for line in open(sys.argv[1]):
    if not line.startswith("RESULT bench=generate"):
        continue
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    runs[(int(kv["batch"]), int(kv["adapters"]))][kv["variant"]].append(float(kv["decode_tokens_per_s"]))
fmt = lambda xs: ", ".join(f"{x:,.1f}" for x in xs)
print("\ndecode tokens/s            old                  new                  new / old (means)")
for (batch, adapters), v in sorted(runs.items()):
    old, new = v["old"], v["new"]
    ratio = (sum(new) / len(new)) / (sum(old) / len(old)) if old and new else float("nan")
    print(f"batch {batch:2d}, {adapters} adapters   {fmt(old):20s} {fmt(new):20s} {ratio:.3f}")
# Latencies (lower is better): time to first token alone, and with --arrival beside decoding ones.
latency = collections.defaultdict(lambda: {"old": [], "new": []})
for line in open(sys.argv[1]):
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    if line.startswith("RESULT bench=ttft") and "variant" in kv:
        latency[f"ttft ms, {kv['prompt_tokens']}-token prompt"][kv["variant"]].append(float(kv["ttft_ms"]))
    elif line.startswith("RESULT bench=arrival") and "variant" in kv:
        where = f"{kv['prompt_tokens']}-token prompt beside {kv['running']}"
        latency[f"arrival ttft ms, {where}"][kv["variant"]].append(float(kv["ttft_ms"]))
        latency[f"arrival longest gap ms, {where}"][kv["variant"]].append(float(kv["longest_gap_ms"]))
for name, v in latency.items():
    old, new = v["old"], v["new"]
    ratio = (sum(new) / len(new)) / (sum(old) / len(old)) if old and new else float("nan")
    print(f"{name}: old {fmt(old)}, new {fmt(new)}, new / old {ratio:.3f}")
PYEOF
fi
log done
cat "$RESULT"
