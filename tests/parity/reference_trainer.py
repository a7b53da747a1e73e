"""The PEFT + torch training loop lorad's Trainer must reproduce step for step.

The tiny fixture model in fp32, the same initial LoRA weights (written here to a PEFT adapter
folder that both sides load; B is perturbed from PEFT's zeros so every factor gets gradients from
step 1), the same batches (tests/fixtures/qa_small.jsonl formatted by reference_trainer_format,
file order, micro-batches of consecutive rows, right padding), and per optimizer step:
  loss = sum of token cross entropies over its grad_accum micro-batches / their trained tokens
  (each micro-batch backpropagates its share, as transformers' Trainer with num_items_in_batch),
  torch.nn.utils.clip_grad_norm_, then torch.optim.AdamW (or bitsandbytes' AdamW8bit, what
  transformers' optim="adamw_8bit" builds) and get_linear_schedule_with_warmup.
Writes per case the per-step loss, grad norm and lr, and the final adapter (PEFT folder)."""
import json
import pathlib

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

import reference_trainer_format as fmt

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HYPER = dict(lr=5e-3, warmup=3, steps=20, weight_decay=0.01, max_grad_norm=1.0, betas=(0.9, 0.999),
             eps=1e-8, max_seq_length=512)
CASES = [  # name, micro_batch_size, grad_accum, response_only, optimizer, r
    ("full", 2, 1, False, "adamw", 8),
    ("accum4", 2, 4, False, "adamw", 8),
    ("response_only", 2, 1, True, "adamw", 8),
    ("adamw_8bit", 2, 1, True, "adamw_8bit", 16),
]


def load_base(model):
    return AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)


def write_init_adapter(model, folder, r):
    torch.manual_seed(1234)
    peft_model = get_peft_model(load_base(model), LoraConfig(
        r=r, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    peft_model.save_pretrained(str(folder))


def micro_batches(examples, batch):
    """Micro-batch k of the run: consecutive rows of the file, epoch after epoch."""
    per_epoch = (len(examples) + batch - 1) // batch
    k = 0
    while True:
        i = k % per_epoch
        yield examples[i * batch:(i + 1) * batch]
        k += 1


def trained_tokens(labels):
    return sum(1 for x in labels[1:] if x != fmt.IGNORE)


def run_case(model, init, out, name, batch, accum, response_only, optimizer, r):
    tok = AutoTokenizer.from_pretrained(str(model))
    examples = [fmt.format_record(tok, rec, "chat", response_only, HYPER["max_seq_length"])
                for rec in fmt.read_jsonl(fmt.QA)]
    peft_model = PeftModel.from_pretrained(load_base(model), str(init), is_trainable=True)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"],
                                weight_decay=HYPER["weight_decay"])
    else:
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(params, lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"],
                                  weight_decay=HYPER["weight_decay"])
    sched = get_linear_schedule_with_warmup(opt, HYPER["warmup"], HYPER["steps"])
    stream = micro_batches(examples, batch)
    losses, norms, lrs = [], [], []
    for _ in range(HYPER["steps"]):
        mbs = [next(stream) for _ in range(accum)]
        total = sum(trained_tokens(lab) for mb in mbs for _, lab in mb)
        loss_sum = 0.0
        for mb in mbs:
            width = max(len(ids) for ids, _ in mb)
            ids = torch.zeros(len(mb), width, dtype=torch.long)
            mask = torch.zeros(len(mb), width, dtype=torch.long)
            targets = torch.full((len(mb), width), fmt.IGNORE, dtype=torch.long)
            for b, (row_ids, row_labels) in enumerate(mb):
                n = len(row_ids)
                ids[b, :n] = torch.tensor(row_ids)
                mask[b, :n] = 1
                targets[b, :n - 1] = torch.tensor(row_labels[1:])
            logits = peft_model(input_ids=ids, attention_mask=mask).logits.float()
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=fmt.IGNORE, reduction="sum")
            (loss / total).backward()
            loss_sum += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, HYPER["max_grad_norm"])
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum / total)
        norms.append(norm.item())
    final = out / f"final_{name}"
    peft_model.save_pretrained(str(final))
    return {"name": name, "micro_batch_size": batch, "grad_accum": accum,
            "response_only": response_only, "optimizer": optimizer, "r": r,
            "init_adapter": str(init), "final_adapter": str(final), "dataset": str(fmt.QA),
            "losses": losses, "grad_norms": norms, "lrs": lrs}


def write(out: pathlib.Path, model: pathlib.Path) -> None:
    inits = {}
    for r in sorted({c[5] for c in CASES}):
        inits[r] = out / f"init_r{r}"
        write_init_adapter(model, inits[r], r)
    cases = [run_case(model, inits[c[5]], out, *c) for c in CASES]
    hyper = dict(HYPER, betas=list(HYPER["betas"]))
    (out / "trainer.json").write_text(json.dumps({"hyper": hyper, "cases": cases}))
