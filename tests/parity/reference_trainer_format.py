"""Training examples as token ids and labels, formatted with transformers' tokenizer and the
model's Jinja chat template, by the rules engine/train/example_formatter.h states (written out
again here, independently of the C++): Alpaca prompt, raw prompt + response, chat template turns
(nothing appended: each assistant turn ends with the template's end of turn, as in TRL), EOS
appended to the others, -100 outside the responses when response-only, truncation to
max_seq_length."""
import json
import pathlib

from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
QA = ROOT / "tests" / "fixtures" / "qa_small.jsonl"
ALPACA = ROOT / "tests" / "unit" / "engine" / "train" / "alpaca_sample.jsonl"
CHAT = ROOT / "tests" / "unit" / "engine" / "train" / "chat_sample.jsonl"
TEXT = ROOT / "tests" / "unit" / "engine" / "train" / "text_sample.jsonl"
IGNORE = -100

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes the "
                     "request.\n\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def to_messages(rec):
    if "messages" in rec:
        return rec["messages"]
    if isinstance(rec.get("prompt"), list):  # TRL's conversational prompt-completion
        return rec["prompt"] + rec["completion"]
    if "instruction" in rec:
        prompt = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]
    if "prompt" in rec:
        return [{"role": "user", "content": rec["prompt"]},
                {"role": "assistant", "content": rec["completion"]}]
    return [{"role": "user", "content": rec["question"]},
            {"role": "assistant", "content": rec["answer"]}]


def finish(tok, ids, labels, max_len, append_eos):
    if append_eos and (not ids or ids[-1] != tok.eos_token_id):
        ids = ids + [tok.eos_token_id]
        labels = labels + [tok.eos_token_id]
    return ids[:max_len], labels[:max_len]


def format_pair(tok, prompt, response, response_only):
    ids = tok(prompt + response, add_special_tokens=True)["input_ids"]
    labels = list(ids)
    if response_only:
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        n = 0
        while n < len(p) and n < len(ids) and p[n] == ids[n]:
            n += 1
        labels[:n] = [IGNORE] * n
    return ids, labels


def format_alpaca(tok, rec, response_only):
    if "instruction" in rec:
        instruction, inp, response = rec["instruction"], rec.get("input") or "", rec["output"]
    else:
        msgs = [m for m in to_messages(rec) if m["role"] != "system"]
        instruction, inp, response = msgs[0]["content"], "", msgs[1]["content"]
    prompt = ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT
    prompt += f"### Instruction:\n{instruction}\n\n"
    if inp:
        prompt += f"### Input:\n{inp}\n\n"
    prompt += "### Response:\n"
    return format_pair(tok, prompt, response, response_only)


def format_chat(tok, rec, response_only):
    msgs = to_messages(rec)

    def enc(k, gen):
        text = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=gen)
        return tok(text, add_special_tokens=False)["input_ids"]

    ids = enc(len(msgs), False)
    if not response_only:
        return ids, list(ids)
    def assistant_start():  # a conversation opening with the assistant: what precedes its text
        text = tok.apply_chat_template(msgs[:1], tokenize=False)
        return tok(text[:text.index(msgs[0]["content"])], add_special_tokens=False)["input_ids"]

    # A conversational prompt's own assistant turns do not train (TRL: only the completion).
    first_trained = len(rec["prompt"]) if isinstance(rec.get("prompt"), list) else 0
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i < first_trained:
            continue
        before = enc(i, True) if i > 0 else assistant_start()
        begin, end = min(len(before), len(ids)), min(len(enc(i + 1, False)), len(ids))
        labels[begin:end] = ids[begin:end]
    return ids, labels


def format_raw(tok, rec, response_only):
    msgs = [m for m in to_messages(rec) if m["role"] != "system"]
    return format_pair(tok, msgs[0]["content"], msgs[1]["content"], response_only)


def format_text(tok, rec):
    """A text record: every token trains. A text that begins with the BOS written out (a chat
    template's output, apply_chat_template(tokenize=False)) gets no second BOS, as Unsloth's
    SFT preparation encodes it (add_special_tokens=False when the text already has the BOS)."""
    text = rec["text"]
    ids = tok(text, add_special_tokens=not text.startswith(tok.bos_token))["input_ids"]
    return ids, list(ids)


def format_record(tok, rec, template, response_only, max_len):
    """template: 'alpaca', 'raw' or 'chat' (the rules of 'auto' for these files)."""
    if "text" in rec:
        ids, labels = format_text(tok, rec)
        return finish(tok, ids, labels, max_len, append_eos=True)
    if template == "alpaca":
        ids, labels = format_alpaca(tok, rec, response_only)
    elif template == "raw":
        ids, labels = format_raw(tok, rec, response_only)
    else:
        ids, labels = format_chat(tok, rec, response_only)
    return finish(tok, ids, labels, max_len, append_eos=template != "chat")


CASES = [  # (name, file, template, response_only, max_seq_length)
    ("qa_chat_response_only", QA, "chat", True, 512),
    ("qa_chat_all_tokens", QA, "chat", False, 512),
    ("qa_alpaca", QA, "alpaca", True, 512),
    ("alpaca_response_only", ALPACA, "alpaca", True, 512),
    ("alpaca_truncated", ALPACA, "alpaca", False, 40),
    # System turn, two assistant turns, a conversation ending with a user turn (nothing trained
    # after it), one opening with the assistant, TRL's conversational prompt-completion.
    ("chat_turns", CHAT, "chat", True, 512),
    ("qa_raw", QA, "raw", True, 512),
    # Text records, one opening with the BOS written out (one BOS, not two) and one without.
    ("text_bos_written_out", TEXT, "auto", True, 512),
]


def write(out: pathlib.Path, model: pathlib.Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(model))
    cases = []
    for name, path, template, response_only, max_len in CASES:
        examples = [format_record(tok, r, template, response_only, max_len)
                    for r in read_jsonl(path)]
        cases.append({"name": name, "file": str(path), "template": template,
                      "response_only": response_only, "max_seq_length": max_len,
                      "input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]})
    (out / "formatting.json").write_text(json.dumps(cases))
