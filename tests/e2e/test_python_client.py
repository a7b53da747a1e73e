"""clients/python/lorad_client.py, the Python client example, against the real daemon: the
README's walk-through (submit a job, watch its loss, chat with its adapter) through it."""
import json
import os
import shutil
import subprocess
import sys

from conftest import ROOT, start_daemon, stop_daemon

CLIENT = ROOT / "clients" / "python" / "lorad_client.py"


def run_client(address, *args):
    result = subprocess.run([sys.executable, str(CLIENT), "--address", address, *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_submit_watch_chat_and_list_through_the_python_example(tmp_path, stubs):
    d = start_daemon(tmp_path)
    try:
        datasets = tmp_path / "data" / "datasets"
        datasets.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "tests" / "fixtures" / "qa_small.jsonl", datasets / "qa.jsonl")
        job = tmp_path / "job.json"
        job.write_text(json.dumps({
            "adapter_name": "qa-py",
            "dataset": {"path": "qa.jsonl", "format": "DATASET_FORMAT_QA"},
            "lora": {"r": 4, "alpha": 8},
            "training": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 1,
                         "learning_rate": 2e-3, "max_seq_length": 128},
        }))
        job_id = run_client(d.grpc_address, "submit", str(job), "--request-id", "py-1").strip()
        assert job_id.startswith("job-"), job_id
        # A piped reader that stops early, and a job file that is not a JobSpec's JSON (loradctl's
        # short enum names): no traceback.
        head = subprocess.run(f"{sys.executable} {CLIENT} --address {d.grpc_address} watch "
                              f"{job_id} | head -n 1", shell=True, capture_output=True, text=True,
                              timeout=300)
        assert head.stdout.startswith("step 1 ") and head.stderr == "", head.stderr
        short = tmp_path / "short.json"
        for body in (json.dumps({"adapter_name": "x", "dataset": {"format": "qa"}}), "null"):
            short.write_text(body)
            bad = subprocess.run([sys.executable, str(CLIENT), "--address", d.grpc_address,
                                  "submit", str(short)], capture_output=True, text=True,
                                 timeout=60)
            assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
            assert bad.stderr.startswith("lorad_client: "), bad.stderr
        # Sent again (a retry), the same request_id names the same job.
        assert run_client(d.grpc_address, "submit", str(job), "--request-id", "py-1").strip() == \
            job_id

        watched = run_client(d.grpc_address, "watch", job_id).splitlines()
        steps = [line for line in watched if line.startswith("step ")]
        assert [line.split()[1] for line in steps] == ["1", "2", "3"], watched
        assert watched[-1].startswith("succeeded: adapter qa-py v1, 3 steps"), watched
        # Its request_id sent again once it has ended: the same job, and stderr says so.
        ended = subprocess.run([sys.executable, str(CLIENT), "--address", d.grpc_address,
                                "submit", str(job), "--request-id", "py-1"],
                               capture_output=True, text=True, timeout=60)
        assert ended.returncode == 0 and ended.stdout.strip() == job_id, ended.stderr
        assert "which has ended (JOB_STATE_SUCCEEDED); nothing new was queued" in ended.stderr

        listed = run_client(d.grpc_address, "adapters")
        assert "qa-py  v1  rank 4  serving" in listed, listed
        replies = run_client(d.grpc_address, "chat", "--adapter", "qa-py", "--max-new-tokens",
                             "4", "What is 2+2?", "And 3+3?")
        assert replies.count("\n") >= 2, replies  # each turn's reply ends its line
        cut = subprocess.run([sys.executable, str(CLIENT), "--address", d.grpc_address, "chat",
                              "--max-new-tokens", "1", "What is 2+2?"], capture_output=True,
                             text=True, timeout=120)
        assert cut.returncode == 0 and "the reply was cut at 1 tokens" in cut.stderr, cut.stderr
        # The library: a prefilled reply is continued; continuing a user's message is refused
        # naming the field (so the field reached the server).
        sys.path.insert(0, str(CLIENT.parent))
        from lorad_client import LoradClient

        client = LoradClient(d.grpc_address)
        text = "".join(client.chat([("user", "Hi"), ("assistant", "Sure,")], adapter="qa-py",
                                   continue_final_message=True, max_new_tokens=2))
        assert client.last_finish is not None and client.last_usage.completion_tokens >= 1, text
        import grpc

        try:
            list(client.chat([("user", "Hi")], continue_final_message=True, max_new_tokens=2))
            raise AssertionError("continuing a user's message was not refused")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            assert "continue_final_message" in e.details(), e.details()

        # A job that fails (its dataset became unreadable while it waited behind another): watch
        # says so and exits 1.
        import grpc

        tpb = stubs.training_pb2
        with grpc.insecure_channel(d.grpc_address) as channel:
            train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            ahead = train.SubmitJob(tpb.SubmitJobRequest(spec=tpb.JobSpec(
                adapter_name="ahead", dataset=tpb.DatasetSpec(path="qa.jsonl"),
                training=tpb.TrainingSpec(max_steps=100000, max_seq_length=64))), timeout=30)
            shutil.copy(ROOT / "tests" / "fixtures" / "qa_small.jsonl", datasets / "qa2.jsonl")
            spec = json.loads(job.read_text())
            spec["adapter_name"] = "qa-py-fails"
            spec["dataset"]["path"] = "qa2.jsonl"
            job.write_text(json.dumps(spec))
            failing = run_client(d.grpc_address, "submit", str(job)).strip()
            (datasets / "qa2.jsonl").write_text('{"question": "q", "answer": \n')
            train.CancelJob(tpb.CancelJobRequest(job_id=ahead.id), timeout=30)
        result = subprocess.run([sys.executable, str(CLIENT), "--address", d.grpc_address,
                                 "watch", failing], capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "failed: " in result.stdout, result.stdout
    finally:
        stop_daemon(d)


def test_clients_starting_together_each_get_whole_stubs(tmp_path):
    """Processes starting at once with an empty stub cache (a service's workers after a proto
    change): each imports whole modules (one imported another's half-written ones and died with
    an AttributeError traceback, 2 runs in 30), and one compiled copy is left."""
    from conftest import free_port

    env = dict(os.environ, LORAD_CACHE=str(tmp_path / "cache"))  # where the stubs go
    for _ in range(3):
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        procs = [subprocess.Popen([sys.executable, str(CLIENT), "--address",
                                   f"127.0.0.1:{free_port()}", "adapters"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            # Nothing listens there: the call's own error, after the stubs imported.
            assert p.returncode == 1 and err.startswith("lorad_client: UNAVAILABLE"), err
        cache = tmp_path / "cache" / "py-stubs"
        assert len(list(cache.iterdir())) == 1, list(cache.iterdir())


def test_the_python_client_reads_back_a_job_over_4_mb(tmp_path, stubs):
    """GetJob returns a job's inline examples, which lorad accepts up to server.max_request_bytes:
    the client kept gRPC's 4 MB receive limit and could not read the state of a job it had just
    queued (RESOURCE_EXHAUSTED), which loradctl reads."""
    d = start_daemon(tmp_path, "--set", "server.max_request_bytes=16777216", "--set",
                     "training.max_running_jobs=0")
    try:
        sys.path.insert(0, str(CLIENT.parent))
        from lorad_client import LoradClient

        client = LoradClient(d.grpc_address, stubs=stubs)
        examples = [{"json": json.dumps({"text": f"example {i} " + "x" * 1000})}
                    for i in range(6000)]
        job_id = client.submit({"adapter_name": "big", "dataset": {"inline_examples": examples}})
        assert client.state(job_id) == "JOB_STATE_QUEUED"
    finally:
        stop_daemon(d)
