"""InferenceService.Chat's prompts against the real daemon (tiny fixture model): the template's
rendering and tokens, the end-of-turn stops, the Alpaca prompt as training gave it, a template
named on a model folder without one, a prefilled reply continued; and Generate's text from a
prompt of the BOS alone."""
import json
import shutil

import grpc
import pytest

from conftest import start_daemon, stop_daemon, tiny_model_path
from test_inference_service import collect, reference, server  # noqa: F401 (fixtures)


def test_chat_end_of_turn_stops_do_not_count_against_the_callers_limits(server):
    """Chat adds its template's end of turn to the stops; a request with as many stops as the
    documented limit (64 strings, 1,024 ids) is still taken, and one past it is named."""
    _, stub, pb, _, _, _ = server
    messages = [pb.ChatMessage(role="user", content="Hello there")]
    full = pb.SamplingParams(max_new_tokens=2, temperature=0.0,
                             stop=[f"stop{i}" for i in range(64)],
                             stop_token_ids=[100 + i % 400 for i in range(1024)])
    for template in ("chatml", "llama3"):  # end of turn as a string / as a token or string
        chunks, _ = collect(stub.Chat(pb.ChatRequest(messages=messages, template=template,
                                                     sampling=full), timeout=60))
        assert chunks[-1].finish_reason, template
    over = pb.SamplingParams(max_new_tokens=2, stop=[f"stop{i}" for i in range(65)])
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Chat(pb.ChatRequest(messages=messages, template="chatml", sampling=over),
                          timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "sampling.stop: 65 strings; at most 64", err.value.details()


def test_chat_renders_the_template_and_streams(server, reference):
    _, stub, pb, _, _, _ = server
    _, tok = reference
    req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Hello there")],
                         template="chatml",
                         sampling=pb.SamplingParams(max_new_tokens=6, temperature=0.0))
    chunks, ids = collect(stub.Chat(req, timeout=60))
    assert 1 <= len(ids) <= 6
    rendered = "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    assert chunks[-1].usage.prompt_tokens == len(tok(rendered, add_special_tokens=False).input_ids)
    # Bad fields are named: an unknown template, an unknown role.
    for bad, field in ((pb.ChatRequest(messages=req.messages, template="nope"), "template: "),
                       (pb.ChatRequest(messages=[pb.ChatMessage(role="robot", content="x")]),
                        "messages[0].role: ")):
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.Chat(bad, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(field), err.value.details()


ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{}\n\n"
                 "### Response:\n")


def test_an_alpaca_chat_is_the_prompt_alpaca_training_gave_the_model(server, reference):
    """A Chat on the alpaca template gets the tokens lorad's trainer (and the notebooks) give the
    Alpaca prompt, the tokenizer adding the BOS: with the BOS written as text, a sentencepiece
    model lost the space before the first word, a prompt the adapter never saw."""
    _, stub, pb, _, _, _ = server
    _, tok = reference
    sampling = pb.SamplingParams(max_new_tokens=8, temperature=0.0)
    question = "What is the capital of France?"
    chat, chat_ids = collect(stub.Chat(pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content=question)], template="alpaca",
        sampling=sampling), timeout=60))
    trained = tok(ALPACA_PROMPT.format(question)).input_ids  # FormatAlpaca's prompt tokens
    assert chat[-1].usage.prompt_tokens == len(trained)
    # The same text through Generate, which adds the BOS as tokenizer(text) does.
    generate, generate_ids = collect(stub.Generate(pb.GenerateRequest(
        prompt=ALPACA_PROMPT.format(question), sampling=sampling), timeout=60))
    assert generate[-1].usage.prompt_tokens == len(trained)
    assert chat_ids == generate_ids and len(chat_ids) > 0


def test_a_template_named_on_a_model_without_one_writes_the_models_bos(tmp_path, server, stubs):
    """A model folder with no chat template: a Chat naming one writes the folder's BOS token, as
    training does (the family's usual text was written and tokenized as plain text); an Alpaca
    prompt gets the tokenizer's BOS but not the EOS add_eos_token puts after a text (training's
    prompts have none); and a conversation that renders nothing (a system message alone, in
    llama2's and mistral's templates) is refused naming the messages."""
    _, stub, pb, _, _, _ = server
    messages = [pb.ChatMessage(role="user", content="Hello there")]
    sampling = pb.SamplingParams(max_new_tokens=4, temperature=0.0)
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path(), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    config["add_eos_token"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    d = start_daemon(tmp_path / "run", "--set", "model.base_weights=none", model=folder)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            bare = stubs.inference_pb2_grpc.InferenceServiceStub(channel)
            for template in ("llama3", "llama2", "alpaca"):
                request = pb.ChatRequest(messages=messages, template=template, sampling=sampling)
                got, got_ids = collect(bare.Chat(request, timeout=60))
                want, want_ids = collect(stub.Chat(request, timeout=60))  # the folder as it was
                assert got[-1].usage.prompt_tokens == want[-1].usage.prompt_tokens, template
                assert got_ids == want_ids, template
            for template in ("llama2", "mistral"):
                with pytest.raises(grpc.RpcError) as err:
                    collect(bare.Chat(pb.ChatRequest(
                        messages=[pb.ChatMessage(role="system", content="Be nice.")],
                        template=template), timeout=30))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details().startswith(
                    f"messages: the {template} chat template renders nothing"), err.value.details()
    finally:
        stop_daemon(d)


def test_chat_continues_a_prefilled_reply_as_transformers_does(server, reference):
    """continue_final_message: the prompt is transformers' apply_chat_template(
    continue_final_message=True) of the model's own template, the reply is what greedy generate
    gives from it, and its text goes on from the prefill (a first word keeps its space). A
    conversation that does not end with the assistant's message is refused naming the field."""
    import torch

    _, stub, pb, _, _, _ = server
    model, tok = reference
    sampling = pb.SamplingParams(max_new_tokens=8, temperature=0.0)
    for prefill in ("Sure, here ", "Sure, here", "{"):
        messages = [{"role": "user", "content": "Write a list"},
                    {"role": "assistant", "content": prefill}]
        rendered = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        prompt_ids = tok(rendered, add_special_tokens=False).input_ids
        chunks, ids = collect(stub.Chat(pb.ChatRequest(
            messages=[pb.ChatMessage(**m) for m in messages], continue_final_message=True,
            sampling=sampling), timeout=60))
        assert chunks[-1].usage.prompt_tokens == len(prompt_ids), prefill
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        expected = out[0, len(prompt_ids):].tolist()
        assert ids and ids == expected[:len(ids)], prefill
        if len(ids) < 8:  # ended at the template's end of turn (<|im_end|>) or the EOS
            assert expected[len(ids)] in (tok.convert_tokens_to_ids("<|im_end|>"),
                                          tok.eos_token_id), prefill
        text = "".join(c.text for c in chunks)
        whole = tok.decode(prompt_ids + ids, skip_special_tokens=True)
        assert whole == tok.decode(prompt_ids, skip_special_tokens=True) + text, prefill
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Chat(pb.ChatRequest(
            messages=[pb.ChatMessage(role="user", content="Hi")], continue_final_message=True,
            sampling=sampling), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(
        "continue_final_message: the last message must be the assistant's"), err.value.details()


def test_chat_refusals_name_the_messages(server):
    """What the template refuses (roles that do not alternate) and a conversation longer than
    the context name `messages`, the request's field (they named none, or Generate's `prompt`)."""
    _, stub, pb, _, _, _ = server
    user = pb.ChatMessage(role="user", content="Hi")
    long = pb.ChatMessage(role="user", content="hello " * 1500)
    for request, words in (
            (pb.ChatRequest(messages=[user, user], template="llama2"),
             "messages: chat template 'llama2': Conversation roles must alternate"),
            (pb.ChatRequest(messages=[long]), "messages: ")):
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.Chat(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(words), err.value.details()
    assert "tokens; the model's context is" in err.value.details(), err.value.details()


def test_a_prompt_of_the_bos_alone_generates_text_as_the_tokenizer_decodes_it(server, reference):
    """Generate from the BOS alone (unconditional generation: an empty prompt is refused) has no
    prompt text to continue: the reply's first word loses its sentencepiece space, as
    tokenizer.decode(reply) gives it (it kept it: ' sleeps ne' for 'sleeps ne')."""
    _, stub, pb, _, _, _ = server
    _, tok = reference
    chunks, ids = collect(stub.Generate(pb.GenerateRequest(
        prompt=tok.bos_token, add_special_tokens=False,
        sampling=pb.SamplingParams(max_new_tokens=6, temperature=0.0)), timeout=60))
    assert chunks[-1].usage.prompt_tokens == 1 and ids
    text = "".join(c.text for c in chunks)
    assert text == tok.decode(ids, skip_special_tokens=True) and not text.startswith(" "), text
