"""InferenceService and AdapterService over real gRPC against the real daemon (tiny fixture model,
float base so the output can be compared token for token with transformers + PEFT on CPU)."""
import json
import math
import re
import shutil
import threading
import time

import grpc
import pytest

from conftest import long_context_model, start_daemon, stop_daemon, tiny_model_path

PROMPTS = ["The quick brown fox", "Once upon a time", "lorad serves adapters"]


@pytest.fixture(scope="module")
def reference():
    """transformers' model and tokenizer for the fixture, fp32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    return model, tok


def random_peft_model(base, seed, **lora_config):
    """PEFT's own LoRA model on a copy of `base`, with random (non-zero, B scaled up) A and B so
    it changes the output."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora_config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def peft_adapter_dir(tmp_path_factory, reference):
    """A PEFT adapter made by PEFT itself, with random (non-zero) A and B so it changes output."""
    base, _ = reference
    model = random_peft_model(base, 1234, r=8, lora_alpha=16,
                              target_modules=["q_proj", "v_proj", "down_proj"])
    out = tmp_path_factory.mktemp("adapters") / "peft-made"
    model.save_pretrained(out)
    return out, model


def greedy_reference(model, tok, prompt, max_new_tokens, repetition_penalty):
    import torch

    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             repetition_penalty=repetition_penalty,
                             pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return [t for t in new if t != tok.eos_token_id]


@pytest.fixture(scope="module")
def server(tmp_path_factory, stubs):
    tmp = tmp_path_factory.mktemp("inference")
    d = start_daemon(tmp, "--set", "model.base_weights=none")
    channel = grpc.insecure_channel(d.grpc_address)
    yield (d, stubs.inference_pb2_grpc.InferenceServiceStub(channel), stubs.inference_pb2,
           stubs.adapters_pb2_grpc.AdapterServiceStub(channel), stubs.adapters_pb2, tmp)
    channel.close()
    stop_daemon(d)


@pytest.fixture(scope="module")
def long_server(tmp_path_factory, stubs):
    """As `server`, on the fixture's weights with a long context: the tests that hold a request
    running on an adapter while they swap or unload it can count on it running (100,000 tokens,
    cancelled when done; the fixture's 1,024-token context ended one in 1-2 s on a fast
    machine, before the waits those tests count on)."""
    tmp = tmp_path_factory.mktemp("inference-long")
    d = start_daemon(tmp, "--set", "model.base_weights=none", "--set", "limits.max_new_tokens=100000",
                     model=long_context_model(tmp / "long-model"))
    channel = grpc.insecure_channel(d.grpc_address)
    yield (d, stubs.inference_pb2_grpc.InferenceServiceStub(channel), stubs.inference_pb2,
           stubs.adapters_pb2_grpc.AdapterServiceStub(channel), stubs.adapters_pb2, tmp)
    channel.close()
    stop_daemon(d)


def collect(stream):
    chunks = list(stream)
    ids = [t.token_id for c in chunks for t in c.tokens]
    return chunks, ids


def test_generate_equals_transformers_greedy_with_repetition_penalty(server, reference):
    _, stub, pb, _, _, _ = server
    model, tok = reference
    for prompt in PROMPTS:
        req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
            max_new_tokens=12, temperature=0.0, repetition_penalty=1.3))
        chunks, ids = collect(stub.Generate(req, timeout=60))
        expected = greedy_reference(model, tok, prompt, 12, 1.3)
        assert [t for t in ids if t != tok.eos_token_id] == expected, prompt
        last = chunks[-1]
        assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
        assert last.usage.prompt_tokens == len(tok(prompt).input_ids)
        assert last.usage.completion_tokens == len(ids)
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        # The text continues the prompt (a first word keeps its space), as vLLM returns it.
        text = "".join(c.text for c in chunks)
        prompt_ids = tok(prompt).input_ids
        whole = tok.decode(prompt_ids + ids, skip_special_tokens=True)
        head = tok.decode(prompt_ids, skip_special_tokens=True)
        assert whole.startswith(head) and text == whole[len(head):], (text, whole)


def test_logprobs_equal_transformers_log_softmax_and_name_their_tokens(server, reference):
    """logprobs=20: each chosen token's log-probability and its top 20 (ids, values, the tokens'
    own text and bytes) equal log_softmax of transformers' logits before any penalty. The tiny
    model's vocabulary is half byte-fallback pieces: some are among them."""
    import torch

    _, stub, pb, _, _, _ = server
    model, tok = reference
    req = pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParams(
        max_new_tokens=6, temperature=0.0, logprobs=20))
    chunks, ids = collect(stub.Generate(req, timeout=60))
    infos = [t for c in chunks for t in c.tokens]
    byte_pieces = 0
    prompt_ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(torch.cat([prompt_ids, torch.tensor([ids])], dim=1)).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)[prompt_ids.shape[1] - 1:-1]
    for i, info in enumerate(infos):
        assert info.logprob == pytest.approx(logp[i, info.token_id].item(), abs=1e-4)
        top = torch.topk(logp[i], 20)
        assert [t.token_id for t in info.top_logprobs] == top.indices.tolist()
        assert [t.logprob for t in info.top_logprobs] == pytest.approx(top.values.tolist(),
                                                                       abs=1e-4)
        for t in info.top_logprobs:
            piece = tok.convert_ids_to_tokens(t.token_id)
            want = tok.convert_tokens_to_string([piece]) if not piece.startswith("<0x") else None
            assert t.token, f"token {t.token_id} has no text"
            # Its bytes: a byte-fallback piece's one byte, else the text's own.
            if piece.startswith("<0x"):
                byte_pieces += 1
                assert t.token_bytes == bytes([int(piece[3:5], 16)]), (t.token_id, piece)
            else:
                assert t.token_bytes.decode() == t.token, (t.token_id, piece)
            if want is not None and not piece.startswith("\u2581"):
                assert t.token == want, (t.token_id, piece)
    assert byte_pieces > 0
    assert chunks[-1].adapter == "" and chunks[-1].adapter_version == 0


def test_processed_logprobs_are_of_the_distribution_the_token_was_drawn_from(
        tmp_path, stubs, reference):
    """engine.logprobs_mode=processed: with a repetition penalty, each greedy token ranks first
    among its own top entries, and the values equal log_softmax of transformers' scores (the
    logits after its processors), where raw ones need not."""
    import torch

    model, tok = reference
    d = start_daemon(tmp_path, "--set", "model.base_weights=none",
                     "--set", "engine.logprobs_mode=processed")
    try:
        pb = stubs.inference_pb2
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.inference_pb2_grpc.InferenceServiceStub(channel)
            req = pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParams(
                max_new_tokens=6, temperature=0.0, repetition_penalty=1.5, logprobs=3))
            chunks, ids = collect(stub.Generate(req, timeout=60))
    finally:
        stop_daemon(d)
    prompt_ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt_ids, max_new_tokens=6, do_sample=False,
                             repetition_penalty=1.5, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    assert ids == out.sequences[0, prompt_ids.shape[1]:].tolist()[:len(ids)]
    infos = [t for c in chunks for t in c.tokens]
    for i, info in enumerate(infos):
        logp = torch.log_softmax(out.scores[i][0].double(), dim=-1)
        assert info.top_logprobs[0].token_id == info.token_id
        assert info.logprob == pytest.approx(logp[info.token_id].item(), abs=1e-4)
        top = torch.topk(logp, 3)
        assert [t.token_id for t in info.top_logprobs] == top.indices.tolist()
        assert [t.logprob for t in info.top_logprobs] == pytest.approx(top.values.tolist(),
                                                                       abs=1e-4)


def test_seeded_sampling_is_reproducible(server):
    _, stub, pb, _, _, _ = server
    params = pb.SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    runs = [collect(stub.Generate(pb.GenerateRequest(prompt="Once upon", sampling=params),
                                  timeout=60))[1] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 0


@pytest.mark.parametrize("field,sampling,code", [
    ("prompt", None, grpc.StatusCode.INVALID_ARGUMENT),
    ("temperature", dict(temperature=math.nan), grpc.StatusCode.INVALID_ARGUMENT),
    ("temperature", dict(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
    ("top_p", dict(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT),
    ("max_new_tokens", dict(max_new_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT),
    ("max_new_tokens", dict(max_new_tokens=10_000_000), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_requests_name_the_field(server, field, sampling, code):
    _, stub, pb, _, _, _ = server
    prompt = "" if sampling is None else "hello"
    req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(**(sampling or {})))
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(req, timeout=30))
    assert err.value.code() == code
    assert field in err.value.details()
    # ... and the daemon keeps serving.
    ok = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_new_tokens=2))
    assert len(collect(stub.Generate(ok, timeout=30))[1]) >= 1


def test_values_inside_a_range_are_accepted_however_close_to_its_edge(server):
    """The sampling fields are doubles on the wire and floats in the engine: a value inside its
    range stays inside when narrowed (tiny top_p, min_p just under 1, a huge temperature)."""
    _, stub, pb, _, _, _ = server
    for sampling in [dict(top_p=1e-300, temperature=1.0),
                     dict(min_p=0.999999999999, temperature=1.0), dict(temperature=1e39),
                     dict(repetition_penalty=1e-6), dict(repetition_penalty=1e6)]:
        req = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(
            max_new_tokens=2, seed=1, **sampling))
        assert len(collect(stub.Generate(req, timeout=30))[1]) >= 1, sampling
    # Below its range a repetition penalty overflowed float once a logit was divided by it (NaN
    # log-probabilities, the same tokens for every seed): refused, naming the field.
    req = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(
        max_new_tokens=2, repetition_penalty=1e-300))
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(req, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "repetition_penalty: must be in [1e-6, 1e6]" in err.value.details()


def test_unknown_adapter_is_not_found(server):
    _, stub, pb, _, _, _ = server
    req = pb.GenerateRequest(prompt="hi", adapter="nope", sampling=pb.SamplingParams(max_new_tokens=2))
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(req, timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()


def test_client_cancel_stops_generation_and_frees_it(server):
    d, stub, pb, _, _, _ = server
    req = pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(
        max_new_tokens=4000, ignore_eos=True))
    stream = stub.Generate(req, timeout=120)
    first = next(stream)
    assert first.tokens
    stream.cancel()
    # The engine finishes the request as cancelled and keeps serving others.
    ok = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_new_tokens=2))
    assert len(collect(stub.Generate(ok, timeout=30))[1]) >= 1
    status, body = d.http_get("/metrics")
    assert status == 200 and 'finished_reason="cancelled"' in body


def test_peft_adapter_loads_serves_like_peft_and_unloads(server, reference, peft_adapter_dir, stubs):
    import shutil

    d, stub, pb, astub, apb, tmp = server
    model, tok = reference
    src, peft_model = peft_adapter_dir
    root = tmp / "data" / "adapters"
    shutil.copytree(src, root / "made-by-peft")

    loaded = astub.LoadAdapter(apb.LoadAdapterRequest(name="peft-made", path="made-by-peft"),
                               timeout=60)
    assert (loaded.name, loaded.version, loaded.rank) == ("peft-made", 1, 8)
    assert sorted(loaded.target_modules) == ["down_proj", "q_proj", "v_proj"]
    listed = astub.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters
    assert [a.name for a in listed] == ["peft-made"]
    # The base model its adapter_config.json names, as PEFT wrote it.
    import json
    written = json.loads((src / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert written and listed[0].base_model == written, (listed[0], written)

    for prompt in PROMPTS[:2]:
        req = pb.GenerateRequest(prompt=prompt, adapter="peft-made", sampling=pb.SamplingParams(
            max_new_tokens=10, temperature=0.0, repetition_penalty=1.3))
        chunks, ids = collect(stub.Generate(req, timeout=60))
        assert (chunks[-1].adapter, chunks[-1].adapter_version) == ("peft-made", 1)
        expected = greedy_reference(peft_model, tok, prompt, 10, 1.3)
        base = greedy_reference(model, tok, prompt, 10, 1.3)
        assert [t for t in ids if t != tok.eos_token_id] == expected
        assert expected != base, "the test adapter must change the output"
    # The batch's adapter stack (the copy the LoRA kernels read) is counted with device memory.
    _, text = d.http_get("/metrics")
    assert re.search(r'^lorad_memory_bytes\{use="adapter_stack"\} [1-9]', text, re.M), text

    # A version that does not exist (yet) is NOT_FOUND, a negative one INVALID_ARGUMENT.
    for version, code in [(7, grpc.StatusCode.NOT_FOUND), (-1, grpc.StatusCode.INVALID_ARGUMENT)]:
        req = pb.GenerateRequest(prompt="hi", adapter="peft-made", adapter_version=version,
                                 sampling=pb.SamplingParams(max_new_tokens=2))
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.Generate(req, timeout=30))
        assert err.value.code() == code and "adapter_version" in err.value.details()

    # Paths must stay inside the adapter root.
    with pytest.raises(grpc.RpcError) as err:
        astub.LoadAdapter(apb.LoadAdapterRequest(name="evil", path="../../etc"), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    gone = astub.UnloadAdapter(apb.UnloadAdapterRequest(name="peft-made"), timeout=60)
    assert [a.version for a in gone.unloaded] == [1]
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(pb.GenerateRequest(prompt="hi", adapter="peft-made"), timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_replaced_version_is_listed_as_not_current_while_it_drains(long_server, peft_adapter_dir):
    """During a hot swap both versions are listed (the old one until its requests end): only the
    one new requests get is `current`, in ListAdapters and in `loradctl adapters ls`."""
    import json

    from test_loradctl import loradctl

    d, stub, pb, astub, apb, tmp = long_server
    src, _ = peft_adapter_dir
    shutil.copytree(src, tmp / "data" / "adapters" / "swapped")
    load = apb.LoadAdapterRequest(name="swapped", path="swapped")
    assert astub.LoadAdapter(load, timeout=60).version == 1
    held = stub.Generate(pb.GenerateRequest(prompt="Once upon a time", adapter="swapped",
                                            sampling=pb.SamplingParams(max_new_tokens=100000,
                                                                       ignore_eos=True)),
                         timeout=120)
    try:
        assert next(held).tokens  # v1 has a running request
        assert astub.LoadAdapter(load, timeout=60).version == 2
        listed = {a.version: a.current for a in
                  astub.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters
                  if a.name == "swapped"}
        assert listed == {1: False, 2: True}
        table = loradctl("adapters", "ls", address=d.grpc_address)
        assert table.returncode == 0, table.stderr
        states = {line.split()[1]: line.split()[2] for line in table.stdout.splitlines()
                  if line.startswith("swapped ")}
        assert states == {"1": "draining", "2": "serving"}, table.stdout
        as_json = loradctl("adapters", "ls", "--json", address=d.grpc_address)
        assert as_json.returncode == 0, as_json.stderr
        rows = [a for a in json.loads(as_json.stdout)["adapters"] if a["name"] == "swapped"]
        assert {int(a["version"]): a["current"] for a in rows} == {1: False, 2: True}
    finally:
        held.cancel()
    astub.UnloadAdapter(apb.UnloadAdapterRequest(name="swapped"), timeout=60)


def test_adapters_ls_lines_up_cells_after_a_non_ascii_path(server, peft_adapter_dir):
    """The table padded its cells by bytes: a row whose source path held 'é' or '日本' had its
    RESIDENT and ACTIVE cells out of line with the others'."""
    from test_loradctl import loradctl

    d, _, _, astub, apb, tmp = server
    src, _ = peft_adapter_dir
    for name, folder in [("plain", "plain"), ("accented", "kundé ädapter"), ("wide", "日本語")]:
        shutil.copytree(src, tmp / "data" / "adapters" / folder)
        astub.LoadAdapter(apb.LoadAdapterRequest(name=name, path=folder), timeout=60)
    try:
        table = loradctl("adapters", "ls", address=d.grpc_address)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        header = lines[0]
        resident = header.index("RESIDENT")

        def columns(text):  # what a terminal shows: CJK characters take two columns
            return sum(2 if "\u3000" <= ch <= "\u9fff" else 1 for ch in text)

        rows = [line for line in lines[1:] if line.split()[0] in ("plain", "accented", "wide")]
        assert len(rows) == 3, table.stdout
        for row in rows:
            cell = re.search(r"  (yes|no) +\d+$", row)  # RESIDENT, then ACTIVE
            assert cell, row
            assert columns(row[:cell.start(1)]) == resident, table.stdout
    finally:
        for name in ("plain", "accented", "wide"):
            astub.UnloadAdapter(apb.UnloadAdapterRequest(name=name), timeout=60)


def test_rank_and_alpha_patterns_serve_like_peft(server, reference, stubs):
    """PEFT's per-module ranks and alphas (rank_pattern, alpha_pattern; EVA writes them too): the
    same greedy tokens as PEFT, and the listed rank is the largest."""
    d, stub, pb, astub, apb, tmp = server
    base, tok = reference
    model = random_peft_model(base, 77, r=8, lora_alpha=16,
                              target_modules=["q_proj", "v_proj", "down_proj"],
                              rank_pattern={"v_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
                              alpha_pattern={"down_proj": 64, "layers.1.self_attn.q_proj": 2})
    folder = tmp / "data" / "adapters" / "patterns"
    model.save_pretrained(folder)
    loaded = astub.LoadAdapter(apb.LoadAdapterRequest(name="patterns", path="patterns"),
                               timeout=60)
    assert loaded.rank == 8
    for prompt in PROMPTS:
        req = pb.GenerateRequest(prompt=prompt, adapter="patterns", sampling=pb.SamplingParams(
            max_new_tokens=12, temperature=0.0, repetition_penalty=1.3))
        _, ids = collect(stub.Generate(req, timeout=60))
        expected = greedy_reference(model, tok, prompt, 12, 1.3)
        assert [t for t in ids if t != tok.eos_token_id] == expected, prompt
        assert expected != greedy_reference(base, tok, prompt, 12, 1.3)
    astub.UnloadAdapter(apb.UnloadAdapterRequest(name="patterns"), timeout=60)


def test_adapter_folders_that_escape_or_block_are_refused_and_parallel_loads_each_answer(
        server, peft_adapter_dir):
    """A weights file that is a symlink out of the adapter root is PERMISSION_DENIED; a named
    pipe in its place is refused at once (reading it would wait for a writer forever); names a
    job could not publish are refused; 16 loads of one name at once each answer the version they
    published."""
    import concurrent.futures
    import os
    import shutil

    d, stub, pb, astub, apb, tmp = server
    src, _ = peft_adapter_dir
    root = tmp / "data" / "adapters"
    outside = tmp / "outside-the-root"
    shutil.copytree(src, outside, dirs_exist_ok=True)
    (root / "escapes").mkdir(parents=True)
    shutil.copy(src / "adapter_config.json", root / "escapes")
    os.symlink(outside / "adapter_model.safetensors", root / "escapes" / "adapter_model.safetensors")
    with pytest.raises(grpc.RpcError) as err:
        astub.LoadAdapter(apb.LoadAdapterRequest(name="escapes", path="escapes"), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "outside the root" in err.value.details()

    (root / "pipe").mkdir()
    shutil.copy(src / "adapter_config.json", root / "pipe")
    os.mkfifo(root / "pipe" / "adapter_model.safetensors")
    with pytest.raises(grpc.RpcError) as err:
        astub.LoadAdapter(apb.LoadAdapterRequest(name="pipe", path="pipe"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "adapter_model.safetensors is a named pipe (FIFO)" in err.value.details()

    shutil.copytree(src, root / "same")
    # The names a job may publish, no others: "-x" reads as a flag, ".." as a folder.
    for bad in ("..", "-x", ".hidden", "a" * 65):
        with pytest.raises(grpc.RpcError) as err:
            astub.LoadAdapter(apb.LoadAdapterRequest(name=bad, path="same"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("name:"), err.value.details()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(
            lambda _: astub.LoadAdapter(apb.LoadAdapterRequest(name="same", path="same"),
                                        timeout=60), range(16)))
    assert sorted(a.version for a in answers) == list(range(1, 17))
    assert all(a.name == "same" and a.rank == 8 for a in answers)
    astub.UnloadAdapter(apb.UnloadAdapterRequest(name="same"), timeout=60)
    assert d.proc.poll() is None


def test_requests_the_engine_ends_with_an_error_are_logged(server, peft_adapter_dir):
    """An adapter whose weights are finite but overflow the activations (here B = 3e38) makes the
    logits NaN: each request on it ends with an error, and the others keep being served. The
    client had the message and the error counter rose, but the log said nothing; now it names the
    adapter and the error, one line per 10 s however many requests fail."""
    import torch
    from safetensors.torch import load_file, save_file

    d, stub, pb, astub, apb, tmp = server
    src, _ = peft_adapter_dir
    folder = tmp / "data" / "adapters" / "overflows"
    shutil.copytree(src, folder)
    weights = load_file(folder / "adapter_model.safetensors")
    for name, t in weights.items():
        weights[name] = torch.full_like(t, 3e38 if "lora_B" in name else 1.0)
    save_file(weights, folder / "adapter_model.safetensors")
    astub.LoadAdapter(apb.LoadAdapterRequest(name="overflows", path="overflows"), timeout=30)
    try:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                collect(stub.Generate(pb.GenerateRequest(prompt="hello", adapter="overflows",
                                                         sampling=pb.SamplingParams(
                                                             max_new_tokens=4)), timeout=30))
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "not numbers (NaN)" in err.value.details()
        _, ids = collect(stub.Generate(pb.GenerateRequest(
            prompt="hello", sampling=pb.SamplingParams(max_new_tokens=4)), timeout=30))
        assert len(ids) > 0
    finally:
        astub.UnloadAdapter(apb.UnloadAdapterRequest(name="overflows"), timeout=60)
    lines = [line for line in d.log().splitlines() if "ended with an error" in line]
    assert len(lines) == 1, lines
    assert "on adapter 'overflows'" in lines[0] and "not numbers (NaN)" in lines[0], lines


def test_concurrent_streams_and_metrics(server):
    d, stub, pb, _, _, _ = server
    results = {}

    def run(i):
        req = pb.GenerateRequest(prompt=PROMPTS[i % 3], sampling=pb.SamplingParams(
            max_new_tokens=8, temperature=0.0))
        results[i] = collect(stub.Generate(req, timeout=120))[1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Batching never changes a greedy result.
    for i in range(3):
        assert results[i] == results[i + 3]
    from prometheus_client.parser import text_string_to_metric_families

    status, body = d.http_get("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    gen = families["lorad_generation_tokens"].samples
    assert sum(s.value for s in gen if s.name == "lorad_generation_tokens_total") >= 48
    ttft = families["lorad_time_to_first_token_seconds"].samples
    assert any(s.name.endswith("_count") and s.value >= 6 for s in ttft)
    assert "lorad_kv_cache_usage_perc" in families
    queue = families["lorad_request_queue_time_seconds"].samples
    assert any(s.name.endswith("_count") and s.value >= 6 for s in queue)


def test_an_unloaded_adapters_request_series_leave_metrics(long_server, peft_adapter_dir):
    """lorad_request_success_total has a series per adapter: once an adapter's last version is
    unloaded its series go (they stayed until a restart, so adapter churn grew /metrics for
    ever); another adapter's stay, and so do its own while a newer version serves."""
    from prometheus_client.parser import text_string_to_metric_families

    d, stub, pb, astub, apb, tmp = long_server
    folder, _ = peft_adapter_dir
    root = tmp / "data" / "adapters"

    def series(adapter):
        return [s for f in text_string_to_metric_families(d.http_get("/metrics")[1])
                for s in f.samples
                if s.name == "lorad_request_success_total" and s.labels["adapter"] == adapter]

    for name in ("churn-a", "churn-b"):
        shutil.copytree(folder, root / name, dirs_exist_ok=True)
        astub.LoadAdapter(apb.LoadAdapterRequest(name=name, path=name), timeout=60)
        req = pb.GenerateRequest(prompt="Hello", adapter=name,
                                 sampling=pb.SamplingParams(max_new_tokens=2))
        collect(stub.Generate(req, timeout=60))
        assert series(name), name
    # A new version retires the first: the name still serves, its series stay.
    astub.LoadAdapter(apb.LoadAdapterRequest(name="churn-a", path="churn-a"), timeout=60)
    assert series("churn-a")
    astub.UnloadAdapter(apb.UnloadAdapterRequest(name="churn-a"), timeout=60)
    assert series("churn-a") == []
    assert series("churn-b")
    astub.UnloadAdapter(apb.UnloadAdapterRequest(name="churn-b"), timeout=60)
    assert series("churn-b") == []
    # An unload whose deadline comes before a running request ends: answered OK in time (it has
    # taken effect: it said DEADLINE_EXCEEDED although it had), naming the request still
    # draining; new requests get NOT_FOUND, and the series go once the running one ends (they
    # stayed for good).
    shutil.copytree(folder, root / "churn-c", dirs_exist_ok=True)
    astub.LoadAdapter(apb.LoadAdapterRequest(name="churn-c", path="churn-c"), timeout=60)
    collect(stub.Generate(pb.GenerateRequest(prompt="Hello", adapter="churn-c",
                                             sampling=pb.SamplingParams(max_new_tokens=2)),
                          timeout=60))
    stream = stub.Generate(pb.GenerateRequest(prompt="Hello", adapter="churn-c", sampling=pb.SamplingParams(
        max_new_tokens=100000, temperature=0.0, ignore_eos=True)), timeout=120)
    next(stream)  # it runs on the adapter
    unloaded = astub.UnloadAdapter(apb.UnloadAdapterRequest(name="churn-c"), timeout=1.0)
    assert [(a.name, a.current, a.active_requests) for a in unloaded.unloaded] == [
        ("churn-c", False, 1)]
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(pb.GenerateRequest(prompt="Hello", adapter="churn-c"), timeout=60))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert series("churn-c")
    stream.cancel()
    # One whose request ends while it waits: nothing left draining, and nothing said to be.
    shutil.copytree(folder, root / "churn-d", dirs_exist_ok=True)
    astub.LoadAdapter(apb.LoadAdapterRequest(name="churn-d", path="churn-d"), timeout=60)
    stream = stub.Generate(pb.GenerateRequest(prompt="Hello", adapter="churn-d", sampling=pb.SamplingParams(
        max_new_tokens=300, temperature=0.0, ignore_eos=True)), timeout=120)
    next(stream)
    unloaded = astub.UnloadAdapter(apb.UnloadAdapterRequest(name="churn-d"), timeout=120)
    assert [(a.name, a.current, a.active_requests, a.resident) for a in unloaded.unloaded] == [
        ("churn-d", False, 0, False)]
    list(stream)
    deadline = time.time() + 10
    while series("churn-c") and time.time() < deadline:
        time.sleep(0.05)
    assert series("churn-c") == []


def test_a_hot_swap_the_database_cannot_record_leaves_the_served_version(server, peft_adapter_dir):
    """LoadAdapter records a new version before it serves: while the job database refuses writes
    (what a full disk does; here another connection holds its write lock) a hot swap fails, and
    the version that served goes on serving."""
    import sqlite3

    d, stub, pb, astub, apb, tmp = server
    folder, _ = peft_adapter_dir
    root = tmp / "data" / "adapters"
    shutil.copytree(folder, root / "swap-v1", dirs_exist_ok=True)
    first = astub.LoadAdapter(apb.LoadAdapterRequest(name="swap", path="swap-v1"), timeout=60)
    req = pb.GenerateRequest(prompt="Hello", adapter="swap",
                             sampling=pb.SamplingParams(max_new_tokens=4, temperature=0.0))
    _, before = collect(stub.Generate(req, timeout=60))
    blocker = sqlite3.connect(tmp / "data" / "jobs.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(grpc.RpcError) as err:  # after the store's 5 s busy timeout
            astub.LoadAdapter(apb.LoadAdapterRequest(name="swap", path="swap-v1"), timeout=60)
        assert "recording adapter 'swap'" in err.value.details(), err.value.details()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    listed = [(a.name, a.version) for a in
              astub.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters if a.name == "swap"]
    assert listed == [("swap", first.version)]
    chunks, after = collect(stub.Generate(req, timeout=60))
    assert after == before and chunks[-1].adapter_version == first.version
    # Once writes work again the swap goes through, as the next version.
    again = astub.LoadAdapter(apb.LoadAdapterRequest(name="swap", path="swap-v1"), timeout=60)
    assert again.version == first.version + 1
    astub.UnloadAdapter(apb.UnloadAdapterRequest(name="swap"), timeout=60)


def test_unload_calls_waiting_at_once_are_bounded(long_server, peft_adapter_dir):
    """Each UnloadAdapter call waits for its adapter's requests on a thread of its own: beyond 16
    waiting at once, a call is refused (RESOURCE_EXHAUSTED) rather than start another thread;
    the waiting ones finish once the request ends."""
    from concurrent.futures import ThreadPoolExecutor

    d, stub, pb, astub, apb, tmp = long_server
    folder, _ = peft_adapter_dir
    shutil.copytree(folder, tmp / "data" / "adapters" / "busy", dirs_exist_ok=True)
    astub.LoadAdapter(apb.LoadAdapterRequest(name="busy", path="busy"), timeout=60)
    req = pb.GenerateRequest(prompt="Hello", adapter="busy", sampling=pb.SamplingParams(
        max_new_tokens=100000, temperature=0.0, ignore_eos=True))
    stream = stub.Generate(req, timeout=120)
    next(stream)  # it runs on the adapter
    with ThreadPoolExecutor(max_workers=24) as pool:
        def unload(timeout=120):
            try:
                astub.UnloadAdapter(apb.UnloadAdapterRequest(name="busy"), timeout=timeout)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()
        waiting = [pool.submit(unload) for _ in range(16)]
        # Until all 16 wait, a probe may become a waiter itself: its short deadline ends it.
        deadline = time.time() + 30
        refused = None
        while time.time() < deadline and not any(f.done() for f in waiting):
            time.sleep(0.1)
            refused = unload(timeout=2)
            if refused == grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
        assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert not any(f.done() for f in waiting), "the request should still hold the adapter"
        stream.cancel()  # the request ends ...
        assert [f.result(timeout=60) for f in waiting] == [grpc.StatusCode.OK] * 16  # ... and so do they
