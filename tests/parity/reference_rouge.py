"""ROUGE references from Google's rouge_score (no stemming): pairs of texts with case,
punctuation, repeats, non-ASCII letters and empty sides, and their ROUGE-1/2/L F-measures.
Writes rouge/cases.json: [{prediction, reference, rouge1, rouge2, rougeL}]."""
import json
import pathlib

PAIRS = [
    ("The cat sat on the mat.", "the cat is on the mat"),
    ("Paris is the capital of France.", "The capital of France is Paris."),
    ("a a a b", "a b b b"),
    ("Bees make honey, honey, HONEY!", "Bees make honey."),
    ("", "something"),
    ("something", ""),
    ("Größe über 100°C: ja", "grosse uber 100 c ja"),
    ("one two three four five six", "six five four three two one"),
    ("x1 y2-z3_w4", "x1 y2 z3 w4"),
    ("The capital of France is Paris.<|im_end|>", "The capital of France is Paris."),
]


def write(out: pathlib.Path, model: pathlib.Path) -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    cases = []
    for prediction, reference in PAIRS:
        s = scorer.score(reference, prediction)  # rouge_score takes (target, prediction)
        cases.append({"prediction": prediction, "reference": reference,
                      "rouge1": s["rouge1"].fmeasure, "rouge2": s["rouge2"].fmeasure,
                      "rougeL": s["rougeL"].fmeasure})
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False))
