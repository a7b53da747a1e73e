"""A request that leaves sampling fields unset generates with the model's generation_config.json, as
transformers' model.generate(**inputs) does with that folder (and vLLM's --generation-config auto):
the real daemon on copies of the tiny fixture model with their own generation configs."""
import json
import shutil
import subprocess

import grpc
import pytest

from conftest import LORAD, ROOT, free_port, start_daemon, stop_daemon, tiny_model_path

PROMPTS = ["The quick brown fox", "Once upon a time"]


def model_with_generation_config(folder, config):
    shutil.copytree(tiny_model_path(), folder)
    base = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": base["bos_token_id"], "eos_token_id": base["eos_token_id"],
                    **config}))
    return folder


def generate(daemon, stubs, prompt, **sampling):
    pb = stubs.inference_pb2
    with grpc.insecure_channel(daemon.grpc_address) as channel:
        stub = stubs.inference_pb2_grpc.InferenceServiceStub(channel)
        request = pb.GenerateRequest(prompt=prompt)
        if sampling:
            request.sampling.CopyFrom(pb.SamplingParams(**sampling))
        chunks = list(stub.Generate(request, timeout=60))
    return [t.token_id for c in chunks for t in c.tokens], chunks[-1]


def test_unset_fields_generate_as_transformers_generate_with_the_folder_config(tmp_path, stubs):
    """do_sample false: greedy (the file's temperature is ignored, as transformers ignores it),
    with the file's repetition_penalty and max_new_tokens; token ids equal transformers'
    generate() called with nothing but the prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_with_generation_config(tmp_path / "model", {
        "do_sample": False, "temperature": 0.6, "repetition_penalty": 1.3, "max_new_tokens": 9})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    d = start_daemon(tmp_path / "run", "--set", "model.base_weights=none", model=folder)
    try:
        assert "repetition_penalty 1.3, max_new_tokens 9" in d.log()
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, pad_token_id=tok.eos_token_id)
            expected = out[0, ids.shape[1]:].tolist()
            got, last = generate(d, stubs, prompt)
            assert got == expected, prompt
            assert last.usage.completion_tokens == len(expected) <= 9
            # A field the request sets still wins over the file's.
            got, _ = generate(d, stubs, prompt, max_new_tokens=3)
            assert got == expected[:3]
    finally:
        stop_daemon(d)


def test_sampling_config_fills_only_the_fields_a_request_leaves_unset(tmp_path, stubs):
    """do_sample true: an unset request samples with the file's temperature and top_p and
    transformers' own top_k default, exactly as a request giving those values explicitly
    (same seed); model.generation_config: none makes the same request greedy again."""
    from transformers import GenerationConfig

    hf_top_k = GenerationConfig._get_default_generation_params()["top_k"]
    folder = model_with_generation_config(tmp_path / "model", {
        "do_sample": True, "temperature": 1.7, "top_p": 0.95})
    d = start_daemon(tmp_path / "run", model=folder)
    try:
        for prompt in PROMPTS:
            unset, _ = generate(d, stubs, prompt, max_new_tokens=16, seed=11)
            explicit, _ = generate(d, stubs, prompt, max_new_tokens=16, seed=11, temperature=1.7,
                                   top_p=0.95, top_k=hf_top_k, min_p=0.0, repetition_penalty=1.0)
            greedy, _ = generate(d, stubs, prompt, max_new_tokens=16, temperature=0.0)
            assert unset == explicit, prompt
            assert unset != greedy, prompt
    finally:
        stop_daemon(d)
    d = start_daemon(tmp_path / "ignored", "--set", "model.generation_config=none", model=folder)
    try:
        for prompt in PROMPTS:
            unset, _ = generate(d, stubs, prompt, max_new_tokens=16, seed=11)
            greedy, _ = generate(d, stubs, prompt, max_new_tokens=16, temperature=0.0)
            assert unset == greedy, prompt
    finally:
        stop_daemon(d)


def start_up_error(folder, data_dir):
    """The one line lorad prints when it refuses to start on the model folder."""
    args = [str(LORAD), "--config", str(ROOT / "deploy" / "lorad.yaml"), "--model", str(folder),
            "--data-dir", str(data_dir), "--grpc-address", f"127.0.0.1:{free_port()}",
            "--http-address", f"127.0.0.1:{free_port()}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("config, field", [
    ({"do_sample": True, "top_p": 0}, "top_p"),
    ({"do_sample": False, "temperature": "warm"}, "temperature"),
    ({"top_k": 2.5}, "top_k"),
    # Beyond float's range: refused as the infinity it is, not cast (undefined behaviour).
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
])
def test_a_bad_generation_config_stops_start_up_naming_the_file_and_field(tmp_path, config,
                                                                         field):
    folder = model_with_generation_config(tmp_path / "model", config)
    line = start_up_error(folder, tmp_path / "data")
    assert "generation_config.json" in line and f"'{field}'" in line, line
    assert "model.generation_config: none" in line, line
    # ... which starts it, ignoring the file.
    d = start_daemon(tmp_path / "run", "--set", "model.generation_config=none", model=folder)
    stop_daemon(d)


def test_a_generation_config_that_is_not_json_must_be_corrected(tmp_path):
    """A file lorad cannot read is not offered `none` (transformers reads it for its EOS ids too)."""
    folder = model_with_generation_config(tmp_path / "model", {})
    (folder / "generation_config.json").write_text('{"do_sample": true,')
    line = start_up_error(folder, tmp_path / "data")
    assert "generation_config.json" in line and "correct the file" in line, line
    assert "model.generation_config: none" not in line, line


def test_sampling_fields_without_a_temperature_on_a_greedy_model_are_refused(tmp_path, stubs):
    """do_sample false: a request that sets top_p (or top_k, min_p) but no temperature was run
    greedy, its filters silently doing nothing; it is refused, naming the field. With an explicit
    temperature it is served, and so are a seed alone (greedy) and the filters at their off
    values (top_k 0, top_p 1, min_p 0: loradctl's --top-k 0 says "off")."""
    folder = model_with_generation_config(tmp_path / "model", {"do_sample": False})
    d = start_daemon(tmp_path / "run", model=folder)
    try:
        for field, value in (("top_p", 0.9), ("top_k", 40), ("min_p", 0.1)):
            with pytest.raises(grpc.RpcError) as err:
                generate(d, stubs, PROMPTS[0], max_new_tokens=2, **{field: value})
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith(f"sampling.{field}: takes effect only when "
                                                  "sampling"), err.value.details()
        off, _ = generate(d, stubs, PROMPTS[0], max_new_tokens=2, top_k=0, top_p=1.0, min_p=0.0)
        assert off == generate(d, stubs, PROMPTS[0], max_new_tokens=2, temperature=0.0)[0]
        for temperature in (0.0, 0.8):
            got, _ = generate(d, stubs, PROMPTS[0], max_new_tokens=2, temperature=temperature,
                              top_p=0.9, seed=7)
            assert len(got) == 2
        assert generate(d, stubs, PROMPTS[0], max_new_tokens=2, seed=7)[0] == \
            generate(d, stubs, PROMPTS[0], max_new_tokens=2, temperature=0.0)[0]
    finally:
        stop_daemon(d)


def test_chat_ignore_eos_and_stops_at_special_tokens(tmp_path, stubs):
    """A model whose EOS is its chat template's end of turn (<|im_end|>, as Qwen2.5-Instruct's):
    a Chat with ignore_eos goes past it as Generate does (it stopped there, the end of turn added
    as a stop); and a stop string that is a special token's text, which never reaches the
    decoded text, stops at that token."""
    folder = model_with_generation_config(tmp_path / "model", {"do_sample": False,
                                                               "eos_token_id": [2, 4]})
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_end|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    # fp32 weights: the fixture then answers this message with <|im_end|> at once, as
    # transformers does.
    d = start_daemon(tmp_path / "run", "--set", "model.base_weights=none", model=folder)
    pb = stubs.inference_pb2
    messages = [pb.ChatMessage(role="user", content="hi hi bye")]
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.inference_pb2_grpc.InferenceServiceStub(channel)

            def chat(**sampling):
                chunks = list(stub.Chat(pb.ChatRequest(messages=messages, template="chatml",
                                                       sampling=pb.SamplingParams(**sampling)),
                                        timeout=60))
                return chunks[-1]

            ended = chat(max_new_tokens=8, temperature=0.0)
            assert ended.finish_reason == pb.FINISH_REASON_EOS, ended
            assert ended.usage.completion_tokens == 1
            past = chat(max_new_tokens=8, temperature=0.0, ignore_eos=True)
            assert past.finish_reason == pb.FINISH_REASON_LENGTH, past
            assert past.usage.completion_tokens == 8

            rendered = "<|im_start|>user\nhi hi bye<|im_end|>\n<|im_start|>assistant\n"
            request = pb.GenerateRequest(
                prompt=rendered, add_special_tokens=False,
                sampling=pb.SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True,
                                           stop=["<|im_end|>"]))
            chunks = list(stub.Generate(request, timeout=60))
            assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP, chunks[-1]
            assert chunks[-1].usage.completion_tokens == 1
            assert "".join(c.text for c in chunks) == ""
    finally:
        stop_daemon(d)
