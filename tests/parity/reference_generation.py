"""Token ids of transformers.generate on the tiny fixture, with and without PEFT adapters.

Writes into out/ (= <build>/parity/generation/):
  cases.json      {"max_new_tokens", "repetition_penalty", "cases": [{"name", "prompt" (text or
                  null), "prompt_ids", "adapter" (folder or null), "expected" (generated ids)}]}
  adapter_r8/     a PEFT LoRA adapter, r=8, alpha=16, all seven projections, random A and B
  adapter_r4/     a PEFT LoRA adapter, r=4, alpha=4, q_proj and v_proj, random A and B

Greedy decoding (do_sample=False) with repetition_penalty=1.3, stopping at the model's EOS as
generate does; CPU float32. Text prompts are encoded by the Hugging Face tokenizer (with BOS), and
lorad encodes the same text itself.
"""
import json
import pathlib
import shutil

import torch

MAX_NEW_TOKENS = 24
REPETITION_PENALTY = 1.3
TEXT_PROMPTS = ["Once upon a time", "The weather today is"]
ID_PROMPT_LENGTHS = [3, 9, 17]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(folder: pathlib.Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def make_adapter(model_folder: pathlib.Path, out: pathlib.Path, r: int, alpha: int,
                 targets: list[str], seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(load(model_folder), config)
    torch.manual_seed(seed)
    with torch.no_grad():  # PEFT initialises B to zero; random A and B make the adapter matter
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.15 * torch.randn_like(p))
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))


@torch.no_grad()
def generate(model, ids: list[int]) -> list[int]:
    input_ids = torch.tensor([ids])
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         do_sample=False, repetition_penalty=REPETITION_PENALTY,
                         max_new_tokens=MAX_NEW_TOKENS, pad_token_id=0)
    return out[0, len(ids):].tolist()


def write(out: pathlib.Path, model: pathlib.Path) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    g = torch.Generator().manual_seed(17)
    vocab = load(model).config.vocab_size
    prompts = [(text, tokenizer(text)["input_ids"]) for text in TEXT_PROMPTS]
    prompts += [(None, torch.randint(3, vocab, (n,), generator=g).tolist())
                for n in ID_PROMPT_LENGTHS]

    adapters = {None: None}
    adapters["r8"] = out / "adapter_r8"
    make_adapter(model, adapters["r8"], 8, 16, PROJECTIONS, seed=5)
    adapters["r4"] = out / "adapter_r4"
    make_adapter(model, adapters["r4"], 4, 4, ["q_proj", "v_proj"], seed=6)

    cases = []
    for key, folder in adapters.items():
        m = load(model) if folder is None else PeftModel.from_pretrained(load(model), str(folder))
        m.eval()
        for i, (text, ids) in enumerate(prompts):
            cases.append({"name": f"{key or 'base'}_{i}", "prompt": text, "prompt_ids": ids,
                          "adapter": None if folder is None else str(folder),
                          "expected": generate(m, ids)})
    (out / "cases.json").write_text(json.dumps(
        {"max_new_tokens": MAX_NEW_TOKENS, "repetition_penalty": REPETITION_PENALTY,
         "cases": cases}, indent=1))
