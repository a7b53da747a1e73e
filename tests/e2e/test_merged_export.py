"""A trained adapter exported as a merged model: the weights PEFT's merge_and_unload gives, and
the chat template the job trained on (real daemon, real gRPC client, transformers + PEFT)."""
import os
import pathlib
import shutil

import grpc
import pytest

from conftest import start_daemon, stop_daemon
from test_training_end_to_end import job_spec, prepare, watch_until_done


def test_merged_export_equals_peft_merge_and_unload(tmp_path, stubs):
    """export_merged writes the base with the adapter merged in; transformers loads it and its
    logits equal PEFT's merge_and_unload() of the job's own adapter on the same base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import tiny_model_path

    tpb = stubs.training_pb2
    prepare(tmp_path)
    d = start_daemon(tmp_path, "--set", "model.base_weights=none")
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            spec = job_spec(tpb, "merged", 4)
            spec.export_merged = True
            spec.dataset.validation_fraction = 0.25
            job = stub.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=30)
            events, states, _ = watch_until_done(stub, tpb, job.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
            summary = [e.finished for e in events if e.WhichOneof("event") == "finished"][0]
            # The last step's evaluation is reported, and a replay orders it as it came live.
            evals = [e.eval for e in events if e.WhichOneof("event") == "eval"]
            assert [v.step for v in evals] == [4] and summary.best_validation_loss == \
                evals[0].validation_loss
            replay, _, _ = watch_until_done(stub, tpb, job.id)
            assert replay == events
            # loradctl's report shows the summary's paths, absolute, and the validation result.
            import subprocess

            from conftest import BUILD

            shown = subprocess.run([str(BUILD / "clients" / "loradctl"), "--address",
                                    d.grpc_address, "train", "show", job.id],
                                   capture_output=True, text=True, timeout=60)
            assert shown.returncode == 0, shown.stderr
            assert f"merged model: {summary.merged_model_path}\n" in shown.stdout
            assert f"eval report: {summary.eval_report_path}\n" in shown.stdout
            assert summary.merged_model_path.startswith("/") and "ROUGE-L" in shown.stdout
    finally:
        stop_daemon(d)
    # The held-out report: ROUGE of the answers to the 4 held-out questions, recomputed here
    # with rouge_score from the answers the report lists.
    import json

    from rouge_score import rouge_scorer

    report = json.loads(open(summary.eval_report_path).read())
    # It quotes held-out examples: private, as jobs.db (it was 0644).
    assert os.stat(summary.eval_report_path).st_mode & 0o777 == 0o600
    assert report["answered"] == 4 and report["validation_loss"] > 0
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    mean_l = sum(scorer.score(e["reference"], e["prediction"])["rougeL"].fmeasure
                 for e in report["examples"]) / 4
    assert summary.rouge_l == pytest.approx(mean_l, abs=1e-9)
    merged_dir = summary.merged_model_path
    adapter_dir = str(tmp_path / "data" / "jobs" / job.id / "adapter")
    assert merged_dir.endswith("/merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        got, want = merged(ids).logits, reference(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32)(ids).logits
    assert (got - want).abs().max().item() < 1e-4
    assert (want - plain).abs().max().item() > 1e-3, "the adapter must change the model"


def test_merged_export_carries_the_template_the_job_trained_on(tmp_path, stubs):
    """A model folder without a chat template, served with model.chat_template: chatml (as README
    says, so that training and chat agree): the merged export carries ChatML
    (tokenizer_config.json's chat_template and chat_template.jinja), so transformers'
    apply_chat_template gives the prompt lorad's Chat gives, and generation_config.json's EOS ids
    hold <|im_end|>'s, where lorad's Chat stops. The export had no template at all."""
    import json

    from transformers import AutoTokenizer

    from conftest import tiny_model_path

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path(), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tpb, ipb = stubs.training_pb2, stubs.inference_pb2
    prepare(tmp_path)
    d = start_daemon(tmp_path, "--set", "model.base_weights=none", "--set",
                     "model.chat_template=chatml", model=folder)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            spec = job_spec(tpb, "templated", 2)
            spec.export_merged = True
            job = stub.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=30)
            events, states, _ = watch_until_done(stub, tpb, job.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
            merged = [e.finished for e in events if e.WhichOneof("event") == "finished"][0] \
                .merged_model_path
            messages = [{"role": "user", "content": "What is 2+2?"}]
            chat = list(stubs.inference_pb2_grpc.InferenceServiceStub(channel).Chat(
                ipb.ChatRequest(messages=[ipb.ChatMessage(**m) for m in messages],
                                adapter="templated",
                                sampling=ipb.SamplingParams(max_new_tokens=1)), timeout=60))
    finally:
        stop_daemon(d)
    tok = AutoTokenizer.from_pretrained(merged)
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert chat[-1].usage.prompt_tokens == len(tok(rendered, add_special_tokens=False).input_ids)
    written = json.loads((pathlib.Path(merged) / "tokenizer_config.json").read_text())
    assert written["chat_template"] == (pathlib.Path(merged) / "chat_template.jinja").read_text()
    eos = json.loads((pathlib.Path(merged) / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos and tok.eos_token_id in eos, eos
