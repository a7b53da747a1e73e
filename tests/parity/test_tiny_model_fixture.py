"""The tiny fixture model is a real Hugging Face model folder: transformers loads it, its
tokenizer round-trips multilingual text, and it is deterministic from its seed."""
import hashlib
import pathlib
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, tiny_model_path


def test_transformers_loads_the_fixture_and_runs_it():
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path()).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    ids = tok("The model reads a quiet book", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    for p in model.parameters():  # every linear weight quantizes to NF4 in whole blocks
        assert p.numel() % 64 == 0


def test_tokenizer_round_trips_multilingual_text():
    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    for text in ["Grüße aus München!", "東京は日本の首都です。", "Emoji: 😀 🚀", "tabs\tand   spaces"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_generator_is_deterministic(tmp_path):
    digests = []
    for name in ["a", "b"]:
        out = tmp_path / name
        subprocess.run([sys.executable, str(ROOT / "tests/fixtures/make_tiny_model.py"),
                        "--out", str(out)], check=True, capture_output=True)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(out.iterdir())})
    assert digests[0] == digests[1]
    installed = pathlib.Path(tiny_model_path()) / "model.safetensors"
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == digests[0]["model.safetensors"]
