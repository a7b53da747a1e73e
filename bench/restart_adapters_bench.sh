#!/usr/bin/env bash
# How long a restart takes to serve its recorded adapters again (Daemon::ServeRecordedAdapters),
# for two lorad builds in one run: OLD_LORAD (e.g. a build of the commit before a change) and
# NEW_LORAD (default: this checkout's build). CPU only: it runs on the development machine (the
# GPU machine has no gRPC), on a random-init model of the 1b shape (bench/make_bench_model.py)
# with ADAPTERS random PEFT adapters of rank 16 on every projection.
#
#   OLD_LORAD=/tmp/old-build/server/lorad bash bench/restart_adapters_bench.sh
#
# Each build starts ROUNDS times on the same data folder (the adapter files in the page cache
# after the first start, as on a server restarted in place); the time from the log line before
# the first "adapter ... served again" line to the last is printed next to the other build's.
set -euo pipefail
cd "$(dirname "$0")/.."
source build/setup.env
WORK=${WORK:-/tmp/lorad-restart-bench}
ADAPTERS=${ADAPTERS:-24}
ROUNDS=${ROUNDS:-3}
NEW_LORAD=${NEW_LORAD:-$PWD/build/server/lorad}
OLD_LORAD=${OLD_LORAD:?set OLD_LORAD to the lorad binary to compare with}
LORADCTL=$PWD/build/clients/loradctl
PY="$LORAD_VENV/bin/python"
TINY=${LORAD_TINY_MODEL:-$HOME/.cache/lorad/tiny-llama}

mkdir -p "$WORK"
[ -f "$WORK/model/config.json" ] ||
  "$PY" bench/make_bench_model.py --out "$WORK/model" --tokenizer-from "$TINY" --shape 1b
"$PY" - "$WORK" "$ADAPTERS" <<'EOF'
import json, pathlib, sys
import numpy as np
from safetensors.numpy import save_file
work, count = pathlib.Path(sys.argv[1]), int(sys.argv[2])
config = json.loads((work / "model" / "config.json").read_text())
hidden, inter = config["hidden_size"], config["intermediate_size"]
kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv),
          "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (hidden, hidden),
          "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
          "mlp.down_proj": (inter, hidden)}
rank, rng = 16, np.random.default_rng(0)
for n in range(count):
    folder = work / "data" / "adapters" / f"a{n}"
    if (folder / "adapter_model.safetensors").exists():
        continue
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((rank, fan_in), np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((fan_out, rank), np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 32,
        "target_modules": [m.split(".")[1] for m in shapes]}))
EOF
du -sh "$WORK/data/adapters"

port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Starts `$1` on the data folder, waits for it to serve, runs `$2` (a command, may be empty),
# stops it; the log is $WORK/log.
run_daemon() {
  local grpc http
  grpc=$(port) http=$(port)
  "$1" --model "$WORK/model" --device cpu --data-dir "$WORK/data" \
    --grpc-address "127.0.0.1:$grpc" --http-address "127.0.0.1:$http" >"$WORK/log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do
    grep -q "serving gRPC" "$WORK/log" && break
    kill -0 $pid 2>/dev/null || { cat "$WORK/log"; exit 1; }
    sleep 1
  done
  if [ -n "$2" ]; then eval "$2"; fi
  kill -INT $pid
  wait $pid
}
# Seconds from the log line before the first "served again" (the engine's last) to the last one,
# the same for either build.
restore_seconds() {
  "$PY" - "$WORK/log" <<'EOF'
import datetime, re, sys
stamp = re.compile(r"^\[(\S+ \S+) [^\]]*\]")
lines = [l for l in open(sys.argv[1]) if stamp.match(l)]
served = [i for i, l in enumerate(lines) if re.search(r"\] adapter \S+ version \d+ served again", l)]
at = lambda i: datetime.datetime.strptime(stamp.match(lines[i]).group(1), "%Y-%m-%d %H:%M:%S.%f")
print(f"{(at(served[-1]) - at(served[0] - 1)).total_seconds():.2f}" if served else "nan")
EOF
}

if ! grep -q "a$((ADAPTERS - 1))" "$WORK/data/jobs.db" 2>/dev/null; then
  loads=""
  for n in $(seq 0 $((ADAPTERS - 1))); do
    loads+="$LORADCTL --address 127.0.0.1:\$grpc adapters load a$n a$n >/dev/null; "
  done
  run_daemon "$NEW_LORAD" "$loads"
fi
echo "# $(date -u +%F) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# $ADAPTERS adapters of $(du -sh "$WORK/data/adapters" | cut -f1) in all; seconds to serve them again at start"
for round in $(seq "$ROUNDS"); do
  run_daemon "$OLD_LORAD" ""
  old=$(restore_seconds)
  run_daemon "$NEW_LORAD" ""
  new=$(restore_seconds)
  grep -oE "served again in [0-9.]+ s \([0-9]+ thread\(s\)\)" "$WORK/log" | head -1
  echo "round $round: old $old s, new $new s, old/new $("$PY" -c "print(f'{$old / $new:.2f}x')")"
done
