"""Logits and LoRA gradients of Llama-family models from transformers, PEFT and bitsandbytes.

Writes into out/ (= <build>/parity/llama/):
  cases.json               what the C++ test runs: prompts, forward cases, training cases
  <case>.safetensors       per forward case: "prompt.{i}" [T_i, vocab] logits of each prompt alone;
                           with decode, "sequence.{i}" [P_i + 16] int64 (the prompt and transformers'
                           16 greedy tokens) and "sequence_logits.{i}" [P_i + 16, vocab]
  <train case>.safetensors "input_ids" [B, T], "labels" [B, T] (-100 = ignored), "lengths" [B],
                           "loss" [], "<module path>.lora_A" / ".lora_B" gradients; a packed
                           case also "position_ids" [B, T] (starting again at each example)
  adapter/                 a PEFT LoRA adapter (r=8, alpha=16, seven targets, random A and B)
  tiny_sharded/            the fixture saved in several shards (model.safetensors.index.json)
  tiny_bf16/               the fixture saved in bfloat16
  tiny_bnb_nf4/            the fixture with every projection pre-quantized by bitsandbytes
  tiny_mistral/, tiny_qwen2/, tiny_llama3_tied/   other architectures, random init

"nf4" cases replace every q/k/v/o/gate/up/down weight by
dequantize_4bit(quantize_4bit(w, nf4, blocksize 64, compress_statistics=True)): the weights lorad's
NF4 base computes with. Everything runs on CPU in float32.
"""
import json
import pathlib
import shutil

import torch

PROMPT_LENGTHS = [5, 12, 1, 23]
DECODE_STEPS = 16
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 8
LORA_ALPHA = 16


def prompts(vocab: int, seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def load(folder: pathlib.Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def nf4_round_trip(w: torch.Tensor) -> torch.Tensor:
    """dequantize_4bit(quantize_4bit(w)) with bitsandbytes. NF4 blocks run over the flattened
    weight; bitsandbytes 0.50's CPU dequantize_4bit mis-places blocks when a row is not a multiple
    of the block size (e.g. down_proj [128, 352] of the fixture: max error 0.12 instead of 0.02),
    while its CUDA kernel and the format do not. Quantizing the same values viewed as rows of one
    block gives the very same bytes and a correct dequantization on the CPU."""
    import bitsandbytes.functional as bnbf

    rows = w.reshape(-1, 64) if w.numel() % 64 == 0 else w.reshape(1, -1)
    packed, state = bnbf.quantize_4bit(rows, blocksize=64, compress_statistics=True,
                                       quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).reshape(w.shape).to(w.dtype)


def quantize_projections(model, skip: tuple = ()) -> None:
    """Replaces each targeted linear weight by its NF4 round trip, as lorad's nf4 base holds it;
    modules under a `skip` prefix stay as they are (bitsandbytes' llm_int8_skip_modules)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith(skip) and skip:
                continue
            if name.split(".")[-1] in PROJECTIONS and isinstance(module, torch.nn.Linear):
                w = module.weight.data
                module.weight.data = nf4_round_trip(w)


def with_adapter(model, adapter: pathlib.Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).eval()


@torch.no_grad()
def logits_of(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float().contiguous()


@torch.no_grad()
def greedy(model, ids: list[int], steps: int) -> list[int]:
    seq = list(ids)
    for _ in range(steps):  # full recompute each step: the reference uses no cache at all
        seq.append(int(logits_of(model, seq)[-1].argmax()))
    return seq


def forward_case(out: pathlib.Path, name: str, model, prompt_ids, decode: bool) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, ids in enumerate(prompt_ids):
        tensors[f"prompt.{i}"] = logits_of(model, ids)
        if decode:
            seq = greedy(model, ids, DECODE_STEPS)
            tensors[f"sequence.{i}"] = torch.tensor(seq, dtype=torch.int64)
            tensors[f"sequence_logits.{i}"] = logits_of(model, seq)
    save_file(tensors, str(out / f"{name}.safetensors"))


def make_adapter(model_folder: pathlib.Path, out: pathlib.Path) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                        target_modules=PROJECTIONS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(load(model_folder), config)
    torch.manual_seed(11)
    with torch.no_grad():  # PEFT initialises B to zero; random non-zero A and B test both factors
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))


PACKED_EXAMPLES = [[5, 4, 5], [9, 5]]  # example lengths of each packed row (14 tokens)


def train_case(out: pathlib.Path, name: str, model, vocab: int, packed: bool = False) -> None:
    """One training forward + backward through PEFT: the loss and every LoRA gradient.
    packed: rows of several examples kept apart as TRL's padding-free packing trains them:
    position_ids start again at each example (transformers then attends within each), and the
    labels where position_ids is 0 are -100 (DataCollatorForLanguageModeling)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    if packed:
        T = sum(PACKED_EXAMPLES[0])
        assert all(sum(row) == T for row in PACKED_EXAMPLES)
        ids = torch.randint(3, vocab, (len(PACKED_EXAMPLES), T), generator=g)
        positions = torch.tensor([[t for n in row for t in range(n)] for row in PACKED_EXAMPLES])
        labels = ids.clone()
        labels[positions == 0] = -100
        model.train()
        model.zero_grad()
        # use_cache=False, as training runs (with a cache transformers does not look for packing).
        loss = model(input_ids=ids, position_ids=positions, labels=labels, use_cache=False).loss
        lengths = [T] * len(PACKED_EXAMPLES)
        with torch.no_grad():  # transformers did keep them apart: the second example as if alone
            a, n = PACKED_EXAMPLES[0][0], PACKED_EXAMPLES[0][1]
            inside = model(input_ids=ids, position_ids=positions, use_cache=False).logits
            alone = model(input_ids=ids[:1, a:a + n], use_cache=False).logits
            assert torch.allclose(inside[:1, a:a + n], alone, atol=1e-4)
    else:
        lengths = [9, 14]
        T = max(lengths)
        ids = torch.zeros(len(lengths), T, dtype=torch.int64)
        labels = torch.full((len(lengths), T), -100, dtype=torch.int64)
        mask = torch.zeros(len(lengths), T, dtype=torch.int64)
        for b, n in enumerate(lengths):
            ids[b, :n] = torch.randint(3, vocab, (n,), generator=g)
            labels[b, 3:n] = ids[b, 3:n]  # the first tokens are "prompt": no loss on them
            mask[b, :n] = 1
        model.train()
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    tensors = {"input_ids": ids, "labels": labels, "lengths": torch.tensor(lengths),
               "loss": loss.detach().reshape(())}
    if packed:
        tensors["position_ids"] = positions
    prefix = "base_model.model."
    for pname, p in model.named_parameters():
        if "lora_" in pname:
            assert p.grad is not None, pname
            # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
            path, factor = pname[len(prefix):].split(".lora_")
            tensors[f"{path}.lora_{factor.split('.')[0]}"] = p.grad.detach().contiguous()
        else:
            assert p.grad is None and not p.requires_grad, pname
    model.eval()
    save_file(tensors, str(out / f"{name}.safetensors"))


def save_bnb_checkpoint(model_folder: pathlib.Path, out: pathlib.Path,
                        quant_storage: torch.dtype = torch.uint8, skip: tuple = (),
                        quantize_head: bool = False) -> None:
    """The fixture as transformers saves a bitsandbytes 4-bit model: each projection weight packed
    (uint8, or the same bytes as another dtype: bnb_4bit_quant_storage, e.g. bf16 for FSDP) with
    its quant state beside it (Linear4bit._save_to_state_dict's layout); those under a `skip`
    prefix (llm_int8_skip_modules) left as they are; with `quantize_head`, lm_head too (a skip
    list without it)."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(model_folder / "model.safetensors"))
    result = {}
    for key, w in sd.items():
        projection = key.endswith(".weight") and key.split(".")[-2] in PROJECTIONS
        if ((projection and not (skip and key.startswith(skip)))
                or (quantize_head and key == "lm_head.weight")):
            packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                               quant_type="nf4", quant_storage=quant_storage)
            assert packed.dtype == quant_storage, packed.dtype
            result[key] = packed
            for k, v in state.as_dict(packed=True).items():
                result[f"{key}.{k}"] = v
        else:
            result[key] = w
    save_file(result, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model_folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": str(quant_storage).removeprefix("torch."),
        "llm_int8_skip_modules": list(skip) or None,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))


def make_tied_lm_head_only(folder: pathlib.Path) -> pathlib.Path:
    """A small tied Llama saved as safetensors.torch.save_model saves it: the embedding and the
    lm_head are one tensor, stored once, under lm_head.weight."""
    from safetensors.torch import save_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                         initializer_range=0.05)
    model = LlamaForCausalLM(config).eval()
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(str(folder))
    (folder / "model.safetensors").unlink()
    save_model(model, str(folder / "model.safetensors"))
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names, names
    return folder


def make_architectures(out: pathlib.Path) -> dict:
    """Tiny random models of the other architectures lorad runs, saved as transformers does."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    shape = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, head_dim=16, max_position_embeddings=256,
                 initializer_range=0.05)
    specs = {
        "tiny_mistral": (MistralForCausalLM, MistralConfig(
            **shape, num_key_value_heads=1, rms_norm_eps=1e-6, sliding_window=None,
            rope_theta=20000.0)),
        "tiny_qwen2": (Qwen2ForCausalLM, Qwen2Config(
            **shape, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
            tie_word_embeddings=False)),
        # original_max_position_embeddings 64 puts the 8 frequencies of head_dim 16 in all three
        # llama3 bands (kept, interpolated, divided by factor).
        "tiny_llama3_tied": (LlamaForCausalLM, LlamaConfig(
            **shape, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64})),
    }
    folders = {}
    for i, (name, (cls, config)) in enumerate(specs.items()):
        torch.manual_seed(100 + i)
        model = cls(config).to(torch.float32).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.add_(0.1 * torch.randn_like(p))
                if pname.endswith(".bias"):  # Qwen2's q/k/v biases start at zero
                    p.copy_(0.1 * torch.randn_like(p))
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(str(folder))
        folders[name] = folder
    return folders


def write(out: pathlib.Path, model: pathlib.Path) -> None:
    torch.manual_seed(0)
    fixture = load(model)
    vocab = fixture.config.vocab_size
    prompt_ids = prompts(vocab)
    cases = []

    def case(name, folder, base="none", adapter=None, decode=False, reference=None):
        cases.append({"name": name, "model": str(folder), "base": base, "adapter": adapter,
                      "decode": decode, "reference": reference or name})

    # Plain fixture, its sharded and bf16 copies, a bitsandbytes pre-quantized copy.
    forward_case(out, "fixture", fixture, prompt_ids, decode=True)
    case("fixture", model, decode=True)
    sharded = out / "tiny_sharded"
    if sharded.exists():
        shutil.rmtree(sharded)
    fixture.save_pretrained(str(sharded), max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").exists()
    case("sharded", sharded, reference="fixture")

    bf16 = out / "tiny_bf16"
    if bf16.exists():
        shutil.rmtree(bf16)
    load(model).to(torch.bfloat16).save_pretrained(str(bf16))
    forward_case(out, "bf16", load(bf16), prompt_ids, decode=False)  # bf16 weights, fp32 compute
    case("bf16", bf16)

    # LoRA on the float base.
    adapter = out / "adapter"
    make_adapter(model, adapter)
    forward_case(out, "peft", with_adapter(load(model), adapter), prompt_ids, decode=True)
    case("peft", model, adapter=str(adapter), decode=True)

    # NF4 base, alone and with the adapter (QLoRA).
    nf4 = load(model)
    quantize_projections(nf4)
    forward_case(out, "nf4", nf4, prompt_ids, decode=True)
    case("nf4", model, base="nf4", decode=True)
    bnb_folder = out / "tiny_bnb_nf4"
    save_bnb_checkpoint(model, bnb_folder)
    case("bnb_prequantized", bnb_folder, base="nf4", reference="nf4")
    # The same bytes stored as bf16 (bnb_4bit_quant_storage=bfloat16, as FSDP QLoRA saves them).
    bnb_bf16_folder = out / "tiny_bnb_nf4_bf16_storage"
    save_bnb_checkpoint(model, bnb_bf16_folder, quant_storage=torch.bfloat16)
    case("bnb_prequantized_bf16_storage", bnb_bf16_folder, base="nf4", reference="nf4")
    # Layer 0's attention left 16-bit (llm_int8_skip_modules, as "dynamic" 4-bit downloads keep
    # sensitive layers): transformers keeps those projections float, and so must lorad.
    skip = ("model.layers.0.self_attn",)
    partly = load(model)
    quantize_projections(partly, skip=skip)
    forward_case(out, "bnb_skip_modules", partly, prompt_ids, decode=True)
    bnb_skip_folder = out / "tiny_bnb_nf4_skip_modules"
    save_bnb_checkpoint(model, bnb_skip_folder, skip=skip)
    case("bnb_skip_modules", bnb_skip_folder, base="nf4", decode=True)
    # lm_head quantized too (a skip list that leaves it out): transformers computes it from its
    # NF4 weight, lorad from the same weight dequantized once.
    with_head = load(model)
    quantize_projections(with_head)
    with torch.no_grad():
        with_head.lm_head.weight.data = nf4_round_trip(with_head.lm_head.weight.data)
    forward_case(out, "bnb_quantized_head", with_head, prompt_ids, decode=False)
    bnb_head_folder = out / "tiny_bnb_nf4_quantized_head"
    save_bnb_checkpoint(model, bnb_head_folder, quantize_head=True)
    case("bnb_quantized_head", bnb_head_folder, base="nf4")
    # A tied checkpoint holding the shared matrix under lm_head.weight alone (safetensors'
    # save_model keeps one name of a shared tensor): transformers ties it back.
    tied = make_tied_lm_head_only(out / "tiny_tied_lm_head_only")
    forward_case(out, "tied_lm_head_only", load(tied), prompt_ids, decode=True)
    case("tied_lm_head_only", tied, decode=True)
    nf4_peft = load(model)
    quantize_projections(nf4_peft)
    forward_case(out, "nf4_peft", with_adapter(nf4_peft, adapter), prompt_ids, decode=False)
    case("nf4_peft", model, base="nf4", adapter=str(adapter))

    # Other architectures.
    for name, folder in make_architectures(out).items():
        arch = load(folder)
        arch_prompts = prompts(arch.config.vocab_size, seed=8)
        forward_case(out, name, arch, arch_prompts, decode=True)
        cases.append({"name": name, "model": str(folder), "base": "none", "adapter": None,
                      "decode": True, "reference": name, "prompts": arch_prompts})

    # Training: the loss and LoRA gradients through PEFT, on the float and the NF4 base.
    train = []
    from peft import PeftModel

    train_case(out, "train_float", PeftModel.from_pretrained(load(model), str(adapter),
                                                             is_trainable=True), vocab)
    train.append({"name": "train_float", "model": str(model), "base": "none",
                  "adapter": str(adapter)})
    nf4_train = load(model)
    quantize_projections(nf4_train)
    train_case(out, "train_nf4", PeftModel.from_pretrained(nf4_train, str(adapter),
                                                           is_trainable=True), vocab)
    train.append({"name": "train_nf4", "model": str(model), "base": "nf4",
                  "adapter": str(adapter)})
    packed_train = load(model)
    quantize_projections(packed_train)
    train_case(out, "train_nf4_packed", PeftModel.from_pretrained(packed_train, str(adapter),
                                                                  is_trainable=True),
               vocab, packed=True)
    train.append({"name": "train_nf4_packed", "model": str(model), "base": "nf4",
                  "adapter": str(adapter)})

    (out / "cases.json").write_text(json.dumps(
        {"prompts": prompt_ids, "decode_steps": DECODE_STEPS, "cases": cases, "train": train},
        indent=1))
