"""Sampling references: transformers' logits processors (and OpenAI's penalty formula) applied to
random logits and token histories, and transformers' generate() on the tiny model.

Writes out/cases.json, out/greedy.json and out/generate.json; -inf is written as null (JSON has
no infinities). tests/parity/sampling_parity_test.cpp reads them.
"""
import json
import math
import pathlib

import torch
from transformers import (AutoModelForCausalLM, GenerationConfig, LogitsProcessorList,
                          MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

BATCH, VOCAB = 4, 97
PROMPT_LEN, GENERATED_LEN = 9, 14

# (name, parameters); a parameter left out is off. Cases with no temperature and a warper run the
# warper alone (the C++ side sets temperature 1, which divides by 1: the identity).
CASES = [
    ("repetition_1.3", {"repetition_penalty": 1.3}),
    ("repetition_0.7", {"repetition_penalty": 0.7}),
    ("temperature_0.7", {"temperature": 0.7}),
    ("temperature_1.9", {"temperature": 1.9}),
    ("top_k_1", {"top_k": 1}),
    ("top_k_5", {"top_k": 5}),
    ("top_k_40", {"top_k": 40}),
    ("top_p_0.3", {"top_p": 0.3}),
    ("top_p_0.8", {"top_p": 0.8}),
    ("top_p_0.95", {"top_p": 0.95}),
    ("min_p_0.05", {"min_p": 0.05}),
    ("min_p_0.3", {"min_p": 0.3}),
    ("openai_penalties", {"presence_penalty": 0.5, "frequency_penalty": 0.3}),
    ("openai_negative", {"presence_penalty": -0.4, "frequency_penalty": -0.25}),
    ("openai_with_repetition",
     {"repetition_penalty": 1.3, "presence_penalty": 0.6, "frequency_penalty": 0.2}),
    ("chain", {"repetition_penalty": 1.2, "temperature": 0.8, "top_k": 40, "top_p": 0.9,
               "min_p": 0.02}),
    ("chain_tight", {"temperature": 0.5, "top_k": 10, "top_p": 0.6, "min_p": 0.2}),
]


def floats(t: torch.Tensor):
    return [None if (math.isinf(v) and v < 0) else v for v in t.flatten().tolist()]


def hf_processors(p: dict) -> LogitsProcessorList:
    """The processors generate() builds for these settings, in generate()'s order."""
    procs = LogitsProcessorList()
    if p.get("repetition_penalty", 1.0) != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p["repetition_penalty"]))
    if p.get("temperature", 1.0) != 1.0:
        procs.append(TemperatureLogitsWarper(p["temperature"]))
    if p.get("top_k", 0) > 0:
        procs.append(TopKLogitsWarper(p["top_k"]))
    if p.get("top_p", 1.0) < 1.0:
        procs.append(TopPLogitsWarper(p["top_p"]))
    if p.get("min_p", 0.0) > 0.0:
        procs.append(MinPLogitsWarper(p["min_p"]))
    return procs


def openai_penalties(scores: torch.Tensor, generated: torch.Tensor, p: dict) -> torch.Tensor:
    """OpenAI's formula, mu[j] - c[j] * frequency - (c[j] > 0) * presence, over generated tokens
    only, in fp32 and in vLLM's order (frequency, then presence)."""
    presence = p.get("presence_penalty", 0.0)
    frequency = p.get("frequency_penalty", 0.0)
    if presence == 0.0 and frequency == 0.0:
        return scores
    out = scores.clone()
    for b in range(scores.shape[0]):
        counts = torch.zeros(scores.shape[1], dtype=torch.float32)
        for t in generated[b].tolist():
            counts[t] += 1.0
        out[b] = out[b] - frequency * counts
        out[b] = out[b] - presence * (counts > 0).to(torch.float32)
    return out


def processor_cases(gen: torch.Generator):
    cases = []
    for name, params in CASES:
        logits = torch.randn(BATCH, VOCAB, generator=gen) * 3.0
        # Histories drawn from a small range so tokens repeat (a token counted once by the
        # repetition penalty and several times by the frequency penalty).
        prompt = torch.randint(0, 30, (BATCH, PROMPT_LEN), generator=gen)
        generated = torch.randint(10, 40, (BATCH, GENERATED_LEN), generator=gen)
        history = torch.cat([prompt, generated], dim=1)
        scores = logits.clone()
        procs = hf_processors(params)
        # HF's processors come in this order: repetition penalty, then (ours: OpenAI penalties,
        # which HF lacks, between the processors and the warpers), then the warpers.
        if procs and isinstance(procs[0], RepetitionPenaltyLogitsProcessor):
            scores = procs[0](history, scores)
            procs = LogitsProcessorList(procs[1:])
        scores = openai_penalties(scores, generated, params)
        scores = procs(history, scores)
        cases.append({
            "name": name, "params": params, "batch": BATCH, "vocab": VOCAB,
            "logits": floats(logits), "prompt": prompt.tolist(), "generated": generated.tolist(),
            "expected": floats(scores),
        })
    return cases


def greedy_repetition(gen: torch.Generator):
    """Greedy search with repetition_penalty 1.3 for 20 steps on fixed logit sequences: each step's
    logits are a fixed row plus small noise, so without the penalty the same token would win
    again and again."""
    steps, vocab = 20, 50
    base = torch.randn(BATCH, vocab, generator=gen) * 2.0
    noise = torch.randn(steps, BATCH, vocab, generator=gen) * 0.05
    prompt = torch.randint(0, vocab, (BATCH, 6), generator=gen)
    penalty = RepetitionPenaltyLogitsProcessor(1.3)
    ids = prompt.clone()
    step_logits = []
    for s in range(steps):
        logits = base + noise[s]
        step_logits.append(floats(logits))
        next_tokens = torch.argmax(penalty(ids, logits.clone()), dim=-1)
        ids = torch.cat([ids, next_tokens[:, None]], dim=1)
    return {"batch": BATCH, "vocab": vocab, "penalty": 1.3, "prompt": prompt.tolist(),
            "logits": step_logits, "tokens": ids[:, prompt.shape[1]:].tolist()}


def generate_runs(model_dir: pathlib.Path):
    """generate() on the tiny model, recording each step's raw logits and the scores its own
    processor chain produced from them: the chain's order and settings are generate()'s."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    runs = []
    settings = [
        ("greedy_repetition", dict(do_sample=False, repetition_penalty=1.3)),
        ("sample_chain", dict(do_sample=True, temperature=0.3, top_k=50, top_p=0.9, min_p=0.05,
                              repetition_penalty=1.2)),
        ("sample_top_p", dict(do_sample=True, temperature=0.25, top_p=0.7)),
    ]
    prompt = torch.tensor([[1, 57, 203, 57, 311, 89, 57, 140]])
    for name, kwargs in settings:
        torch.manual_seed(1234)
        # top_k defaults to 50 in GenerationConfig: say 0 where the run wants it off. No
        # min_new_tokens: its processor would mask EOS, which the C++ side does not model.
        if kwargs["do_sample"]:
            kwargs.setdefault("top_k", 0)
        config = GenerationConfig(max_new_tokens=12, pad_token_id=0, eos_token_id=2, **kwargs)
        with torch.no_grad():
            out = model.generate(prompt, generation_config=config, output_logits=True,
                                 output_scores=True, return_dict_in_generate=True)
        params = {"repetition_penalty": config.repetition_penalty or 1.0}
        if config.do_sample:
            params.update(temperature=config.temperature, top_k=config.top_k or 0,
                          top_p=config.top_p or 1.0, min_p=config.min_p or 0.0)
        runs.append({
            "name": name, "do_sample": config.do_sample, "params": params,
            "vocab": model.config.vocab_size, "prompt": prompt[0].tolist(),
            "tokens": out.sequences[0, prompt.shape[1]:].tolist(),
            "logits": [floats(l[0]) for l in out.logits],
            "scores": [floats(s[0]) for s in out.scores],
        })
    return runs


def write(out: pathlib.Path, model: pathlib.Path) -> None:
    gen = torch.Generator().manual_seed(20240607)
    (out / "cases.json").write_text(json.dumps(processor_cases(gen)))
    (out / "greedy.json").write_text(json.dumps(greedy_repetition(gen)))
    (out / "generate.json").write_text(json.dumps(generate_runs(model)))
