#!/usr/bin/env python3
"""Pairs the "RESULT k=v ..." lines of lorad's engine benches with the baseline's from the same
run and prints each lorad figure next to its baseline and their ratio (lorad / baseline).

  engine_bench_report.py train LOG...      trainer_bench vs hf_baseline.py train
  engine_bench_report.py generate LOG...   generation_bench vs hf_baseline.py generate

A missing side prints as "-" (e.g. when lorad failed): the report never hides a row.
"""
import sys


def parse(paths):
    rows = []
    for path in paths:
        try:
            lines = open(path, errors="replace").read().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("RESULT "):
                rows.append(dict(kv.split("=", 1) for kv in line.split()[1:]))
    return rows


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def report_train(rows):
    rows = [r for r in rows if r.get("bench") == "train"]
    # Each lorad run is compared with the baseline run that has the same gradient checkpointing
    # setting (lorad prints checkpointing=0/1, the baseline gc=off/on), on the same base when
    # there is one (the 4-bit QLoRA baseline needs bitsandbytes on the GPU machine).
    def baseline_for(r):
        gc = "on" if r.get("checkpointing") == "1" else "off"
        same_gc = [b for b in rows if b["system"] == "hf" and b.get("gc") == gc]
        same_base = [b for b in same_gc if b.get("base") == r.get("base")]
        return (same_base or same_gc or [None])[0]

    print("Training: tokens/s and peak GPU memory (ratio = lorad / transformers+PEFT with the same "
          "gradient checkpointing setting, on the same base when measured)")
    print(f"{'system':<52} {'tokens/s':>10} {'ratio':>7} {'peak GiB':>9} {'ratio':>7}")
    for r in rows:
        tps, peak = float(r["tokens_per_s"]), float(r["peak_gib"])
        if r["system"] == "lorad":
            base_name = "bf16 (unquantized)" if r["base"] == "none" else r["base"]
            ckpt = "on" if r.get("checkpointing") == "1" else "off"
            if r.get("offload") == "1":
                ckpt += " (offloaded)"
            if r.get("kept_layers", "0") != "0":
                ckpt += f" (last {r['kept_layers']} kept)"
            if r.get("kept_mlp", "0") != "0":
                ckpt += f" ({r['kept_mlp']} MLPs kept)"
            if r.get("cap_gib", "0") != "0":
                ckpt += f" [cap {r['cap_gib']} GiB]"
            label = f"lorad {base_name} base, {r['optimizer']}, grad ckpt {ckpt}"
            if r.get("layer_ops") == "torch":
                label += ", torch layer ops"
            if r.get("packing") == "1":
                label += ", short examples packed"
            base = baseline_for(r)
            t_ratio = ratio(tps, float(base["tokens_per_s"])) if base else None
            m_ratio = ratio(peak, float(base["peak_gib"])) if base else None
        else:
            label = (f"transformers+PEFT {r.get('base', 'bf16')}, {r.get('optimizer', 'adamw')}, "
                     f"grad ckpt {r.get('gc')}")
            t_ratio = m_ratio = None
        print(f"{label:<52} {tps:>10.0f} {fmt(t_ratio, '>7.2f')} {peak:>9.2f} "
              f"{fmt(m_ratio, '>7.2f')}")
    # With both baselines in the run (bf16 LoRA, the issue's reference, and 4-bit QLoRA), each
    # lorad run against each of them.
    hf_rows = [b for b in rows if b["system"] == "hf"]
    if len({b.get("base") for b in hf_rows}) > 1:
        print("lorad tokens/s against each baseline with the same gradient checkpointing setting:")
        for r in rows:
            if r["system"] != "lorad":
                continue
            gc = "on" if r.get("checkpointing") == "1" else "off"
            parts = [f"{ratio(float(r['tokens_per_s']), float(b['tokens_per_s'])):.2f}x "
                     f"transformers+PEFT {b.get('base')}"
                     for b in hf_rows if b.get("gc") == gc]
            ops = ", torch layer ops" if r.get("layer_ops") == "torch" else ""
            if r.get("kept_layers", "0") != "0":
                ops += f", last {r['kept_layers']} layers kept"
            if r.get("kept_mlp", "0") != "0":
                ops += f", {r['kept_mlp']} MLPs kept"
            print(f"  lorad ({r['optimizer']}{ops}): " + "; ".join(parts))


def report_generate(rows):
    bound = [r for r in rows if r.get("bench") == "bound"]
    rows = [r for r in rows if r.get("bench") == "generate"]
    # The 4-bit baseline where the run measured one (bitsandbytes carried), else bf16.
    hf_rows = sorted((r for r in rows if r["system"] == "hf"), key=lambda r: r.get("base") == "nf4")
    hf = {(r["batch"], r["adapters"], r["rep"]): r for r in hf_rows}
    hf_base = "4-bit (bitsandbytes)" if any(r.get("base") == "nf4" for r in hf_rows) else "bf16"
    lorad = {(r["batch"], r["adapters"], r["rep"]): r for r in rows
             if r["system"] == "lorad" and r.get("graphs", "1") != "0" and "variant" not in r}
    variants = [r for r in rows if r["system"] == "lorad" and "variant" in r]
    eager = {(r["batch"], r["adapters"], r["rep"]): r for r in rows
             if r["system"] == "lorad" and r.get("graphs") == "0"}
    keys = sorted(set(hf) | set(lorad), key=lambda k: (float(k[2]), int(k[0]), int(k[1])))
    print(f"Generation: tokens/s (ratio = lorad NF4 / transformers {hf_base} generate; with adapters "
          "the baseline is PEFT's mixed-adapter batch)")
    print(f"{'batch':>5} {'adapters':>8} {'rep':>5} | {'lorad decode':>12} {'hf decode':>10} "
          f"{'ratio':>6} | {'lorad e2e':>10} {'hf e2e':>10} {'ratio':>6} | "
          f"{'lorad GiB':>9} {'hf GiB':>7}")
    for key in keys:
        lo, ba = lorad.get(key), hf.get(key)

        def get(r, field):
            return None if r is None else float(r[field])

        ld, hd = get(lo, "decode_tokens_per_s"), get(ba, "decode_tokens_per_s")
        le, he = get(lo, "e2e_tokens_per_s"), get(ba, "e2e_tokens_per_s")
        print(f"{key[0]:>5} {key[1]:>8} {key[2]:>5} | {fmt(ld, '>12.1f')} {fmt(hd, '>10.1f')} "
              f"{fmt(ratio(ld, hd), '>6.2f')} | {fmt(le, '>10.1f')} {fmt(he, '>10.1f')} "
              f"{fmt(ratio(le, he), '>6.2f')} | {fmt(get(lo, 'peak_gib'), '>9.2f')} "
              f"{fmt(get(ba, 'peak_gib'), '>7.2f')}")
    decode = {k: float(r["decode_tokens_per_s"]) for k, r in lorad.items()}
    for key, r in eager.items():
        if key in decode:
            print(f"CUDA graphs at batch {key[0]}, adapters {key[1]}: {decode[key]:.1f} vs "
                  f"{float(r['decode_tokens_per_s']):.1f} decode tok/s without "
                  f"({ratio(decode[key], float(r['decode_tokens_per_s'])):.2f}x)")
    for r in variants:
        key = (r["batch"], r["adapters"], r["rep"])
        if key in decode:
            v = float(r["decode_tokens_per_s"])
            print(f"variant {r['variant']} at batch {key[0]}, adapters {key[1]}: {v:.1f} vs "
                  f"{decode[key]:.1f} decode tok/s ({ratio(v, decode[key]):.2f}x)")
    if bound:
        b = float(bound[-1]["bound_tokens_per_s"])
        for key in sorted(k for k in decode if k[0] == "1"):
            print(f"batch 1, adapters {key[1]}: {decode[key]:.1f} tok/s = "
                  f"{100 * decode[key] / b:.0f}% of the bandwidth bound {b:.1f} tok/s "
                  f"(target >= 70%)")
    for batch in sorted({k[0] for k in decode}, key=int):
        one = [v for k, v in decode.items() if k[0] == batch and k[1] == "1"]
        mixed = [(k[1], v) for k, v in decode.items() if k[0] == batch and int(k[1]) > 1]
        for n, v in mixed:
            if one:
                print(f"batch {batch}: {n} mixed adapters {v:.1f} vs one adapter {one[0]:.1f} "
                      f"decode tok/s ({100 * (v / one[0] - 1):+.1f}%; target within 10%)")


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("train", "generate"):
        sys.exit(__doc__)
    rows = parse(sys.argv[2:])
    report_train(rows) if sys.argv[1] == "train" else report_generate(rows)


if __name__ == "__main__":
    main()
