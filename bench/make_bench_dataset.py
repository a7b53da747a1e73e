#!/usr/bin/env python3
"""Writes a synthetic JSONL dataset of long {"text": ...} records for trainer_bench.

Each text is long enough to fill --min-chars characters, so that after tokenization and
truncation to the bench's max_seq_length every row is full and the token count per step is the
same as the baseline's fixed [batch, seq] shape. Words come from lorad's tiny corpus (its
tokenizer was trained on it, so they tokenize like real text rather than as byte fallbacks).
"""
import argparse
import json
import pathlib
import random

HERE = pathlib.Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--min-chars", type=int, default=12000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    words = (HERE.parent / "tests/fixtures/tiny_corpus.txt").read_text().split()
    rng = random.Random(args.seed)
    with args.out.open("w") as f:
        for _ in range(args.rows):
            text, n = [], 0
            while n < args.min_chars:
                w = rng.choice(words)
                text.append(w)
                n += len(w) + 1
            f.write(json.dumps({"text": " ".join(text)}) + "\n")
    print(f"wrote {args.out}: {args.rows} rows of >= {args.min_chars} characters")


if __name__ == "__main__":
    main()
