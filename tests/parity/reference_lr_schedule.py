"""Learning-rate factors from transformers' schedule functions, step by step."""
import json
import pathlib

import torch
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

CASES = [  # (kind, warmup, total)
    ("linear", 5, 60), ("linear", 0, 20), ("linear", 10, 10),
    ("cosine", 5, 60), ("cosine", 0, 7), ("constant", 5, 30), ("constant", 0, 5),
]


def factors(kind, warmup, total, steps):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    if kind == "linear":
        sched = get_linear_schedule_with_warmup(opt, warmup, total)
    elif kind == "cosine":
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    else:
        sched = get_constant_schedule_with_warmup(opt, warmup)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])  # the lr the optimizer step uses
        opt.step()
        sched.step()
    return out


def write(out: pathlib.Path, model: pathlib.Path) -> None:
    cases = [{"kind": k, "warmup": w, "total": t, "factors": factors(k, w, t, t + 3)}
             for k, w, t in CASES]
    (out / "schedules.json").write_text(json.dumps(cases))
