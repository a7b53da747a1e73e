#!/usr/bin/env bash
# Same-call A/B of QLoRA training speed on the GPU machine: the trainer as at a git revision
# ("old") against the working tree ("new"), both built here, then trainer_bench run old, new, old,
# new, ... on one random-init model. Changes of a few percent are within the spread between
# machines of one kind, so this is how they are judged (as bench/run_generation_ab_on_device.sh
# for decode).
#
#   bash bench/prepare_ab.sh REV        (here: writes .device-ab/, the files that differ)
#   run(command="bash bench/run_trainer_ab_on_device.sh",
#       carry=[".device-debs-engine", ".device-ab"])
#
# env: AB_ROUNDS (default 2), BENCH_SHAPE (default 8b), BENCH_DATE, AB_SAVE_EVERY (a checkpoint
# every N steps, default 0: only the end's; the step lines then show what each one costs the loop),
# AB_STEPS (timed steps, default 8), AB_NAME (a suffix for the results file). Batch 2 x 2048 tokens, r=16
# on all seven projections, 8-bit AdamW, gradient checkpointing: issue 4's benchmark setting.
# Writes $OUT/<date>-<device>-trainer-<shape>-ab.txt (with every step's loss, and whether the first
# round's losses of the two sides are equal: the same data and seed, so a change meant to keep the
# numerics shows them identical) and the two build logs. Never asserts a timing.
set -uo pipefail
OUT=${OUT:-/tmp/lorad-trainer-ab-out}
DATE=${BENCH_DATE:-$(date +%F)}
SHAPE=${BENCH_SHAPE:-8b}
ROUNDS=${AB_ROUNDS:-2}
mkdir -p "$OUT"
source bench/device_build.sh
ab_start
SAVE_EVERY=${AB_SAVE_EVERY:-0}
RESULT=$OUT/$DATE-$DEVICE_TAG-trainer-$SHAPE-ab${AB_NAME:+-$AB_NAME}.txt

log "model ($SHAPE) and dataset"
(make_model && "$PY" bench/make_bench_dataset.py --out "$WORK/train.jsonl" --rows 64 --min-chars 40000 \
    > "$OUT/dataset.log" 2>&1) &
PREP_PID=$!
build_both_sides trainer_bench
wait $PREP_PID
log "model: $(tail -1 "$OUT/model.log")"

{
  ab_header Training
  echo
} > "$RESULT"
if [ "$NEW_RC" = 0 ] && [ "$OLD_RC" = 0 ]; then
  for round in $(seq 1 "$ROUNDS"); do
    for side in old new; do
      echo "== $side, round $round" >> "$RESULT"
      timeout 150 /tmp/trainer_bench-$side --model="$MODEL" --data="$WORK/train.jsonl" \
        --base=nf4 --optimizer=adamw_8bit --micro_batch=2 --seq=2048 --warmup=3 \
        --steps="${AB_STEPS:-8}" --gradient_checkpointing=1 --save_every="$SAVE_EVERY" \
        --output_dir="$WORK/out-$side" 2>&1 |
        grep -E "RESULT|tokens/s|rror|^step " | sed "s/^RESULT /RESULT variant=$side /" \
        >> "$RESULT" || echo "!! exit ${PIPESTATUS[0]}" >> "$RESULT"
      log "$side round $round done"
    done
  done
  "$PY" - "$RESULT" "$SAVE_EVERY" >> "$RESULT" << 'PYEOF'
import re, sys
steps = {"old": [], "new": []}
losses = {"old": [], "new": []}  # each run's per-step losses, in order
step_times = {}  # side -> (step, ms) of every timed step, all rounds
ends = {}  # side -> (held ms, longest call ms) of the last step and the end, each round
save_every = int(sys.argv[2])
side = None
for line in open(sys.argv[1]):
    if line.startswith("== "):
        side = line.split()[1].rstrip(",")
        losses[side].append([])
    elif line.startswith("step ") and side:
        m = re.search(r"loss (\S+)", line)
        if m:
            losses[side][-1].append(float(m.group(1)))
        t = re.match(r"step\s+(\d+)\s+(\S+) ms", line)
        if t and "warm-up" not in line:
            step_times.setdefault(side, []).append((int(t.group(1)), float(t.group(2))))
    elif line.startswith("RESULT variant=") and "bench=train" in line:
        kv = dict(re.findall(r"(\w+)=(\S+)", line))
        steps[kv["variant"]].append(float(kv["step_ms"]))
        if "end_held_ms" in kv:  # what the last step and the end held the loop (trainer_bench)
            ends.setdefault(kv["variant"], []).append((float(kv["end_held_ms"]),
                                                       float(kv["end_longest_ms"])))
if steps["old"] and steps["new"]:
    old = sum(steps["old"]) / len(steps["old"])
    new = sum(steps["new"]) / len(steps["new"])
    print(f"\nmedian step ms: old {steps['old']}, new {steps['new']}; tokens/s new / old {old / new:.3f}")
# With a checkpoint every save_every steps: the mean time of the steps that write one (the loop is
# held for it) and of the others, per side.
if save_every > 0:
    for side in ("old", "new"):
        ck = [ms for s, ms in step_times.get(side, []) if s % save_every == 0]
        other = [ms for s, ms in step_times.get(side, []) if s % save_every != 0]
        if ck and other:
            print(f"{side}: steps that checkpoint {sum(ck) / len(ck):.1f} ms mean ({len(ck)}), "
                  f"the others {sum(other) / len(other):.1f} ms ({len(other)}); "
                  f"the checkpoint holds the loop {sum(ck) / len(ck) - sum(other) / len(other):.1f} ms")
for side in ("old", "new"):
    if side in ends:
        print(f"{side}: the last step and the end held the loop (ms, sum / longest call): "
              + ", ".join(f"{h:.1f} / {l:.1f}" for h, l in ends[side]))
# The same data and seed on both sides: a change meant to keep the numerics shows equal losses.
if losses["old"] and losses["new"] and losses["old"][0] and losses["new"][0]:
    a, b = losses["old"][0], losses["new"][0]
    n = min(len(a), len(b))
    worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a[:n], b[:n]))
    same = "identical" if a[:n] == b[:n] else f"differ, at most {worst:.2e} relative"
    print(f"losses of round 1, {n} steps, old vs new: {same}")
PYEOF
fi
log done
cat "$RESULT"
