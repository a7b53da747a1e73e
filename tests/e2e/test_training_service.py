"""TrainingService over real gRPC: jobs are validated up front, stored durably, listed, watched
and cancelled; bad input gets the status code a gRPC user expects, naming the field.
These daemons hold jobs queued (training.max_running_jobs: 0) so states are deterministic;
tests/e2e/test_training_end_to_end.py runs jobs."""
import os
import shutil
import threading

import grpc
import pytest

from conftest import ROOT, start_daemon, stop_daemon

QA = ROOT / "tests/fixtures/qa_small.jsonl"
HOLD_JOBS = ("--set", "training.max_running_jobs=0")


def dataset_root(daemon_tmp):
    root = daemon_tmp / "data" / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(QA, root / "qa.jsonl")
    return root


@pytest.fixture
def service(tmp_path, stubs):
    d = start_daemon(tmp_path, *HOLD_JOBS)
    root = dataset_root(tmp_path)
    channel = grpc.insecure_channel(d.grpc_address)
    yield d, stubs.training_pb2_grpc.TrainingServiceStub(channel), stubs.training_pb2, root
    channel.close()
    stop_daemon(d)


def spec(pb, **overrides):
    s = pb.JobSpec(adapter_name="qa-bot", dataset=pb.DatasetSpec(path="qa.jsonl"))
    for key, value in overrides.items():
        setattr(s, key, value) if not isinstance(value, dict) else None
    return s


def test_submit_fills_defaults_and_get_returns_the_stored_job(service):
    _, stub, pb, root = service
    job = stub.SubmitJob(pb.SubmitJobRequest(spec=spec(pb)), timeout=30)
    assert job.id.startswith("job-") and job.state == pb.JOB_STATE_QUEUED
    t, lora = job.spec.training, job.spec.lora
    assert (lora.r, lora.alpha, len(lora.target_modules)) == (16, 16, 7)
    # PEFT's and TRL's "all-linear" (a job file's `target_modules: [all-linear]`): the same seven.
    every = spec(pb)
    every.lora.target_modules.append("all-linear")
    every = stub.SubmitJob(pb.SubmitJobRequest(spec=every), timeout=30)
    assert list(every.spec.lora.target_modules) == list(lora.target_modules)
    assert (t.micro_batch_size, t.grad_accum, t.learning_rate, t.warmup_steps) == (2, 4, 2e-4, 5)
    assert t.weight_decay == pytest.approx(0.01) and t.optimizer == pb.OPTIMIZER_ADAMW_8BIT
    assert job.spec.dataset.response_only is True
    assert not job.spec.dataset.HasField("packing_separate")  # no packing: not filled in
    packed = spec(pb)
    packed.dataset.packing = True
    packed = stub.SubmitJob(pb.SubmitJobRequest(spec=packed), timeout=30)
    assert packed.spec.dataset.HasField("packing_separate")
    assert packed.spec.dataset.packing_separate is True  # TRL's padding-free packing
    assert job.spec.dataset.path == str((root / "qa.jsonl").resolve())
    assert job.total_steps == 2  # 16 examples, 1 epoch, batch 2 x 4
    again = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10)
    assert again.spec == job.spec and again.created.seconds > 0
    # A field this lorad does not know (number 1000, 64 KiB) is not stored.
    unknown = b"\xc2\x3e" + b"\x80\x80\x04" + b"x" * 65536
    padded = pb.JobSpec.FromString(spec(pb).SerializeToString() + unknown)
    stored = stub.SubmitJob(pb.SubmitJobRequest(spec=padded), timeout=30)
    assert len(stored.spec.SerializeToString()) == len(job.spec.SerializeToString())


def test_a_queued_job_says_what_it_waits_for(service):
    """A queued job's waiting_for: the jobs that start before it and what holds the line (the
    log and GetJob said only "queued"); loradctl train show prints it."""
    import subprocess

    from conftest import BUILD

    d, stub, pb, _ = service
    later = stub.SubmitJob(pb.SubmitJobRequest(spec=spec(pb)), timeout=30)
    urgent = spec(pb)
    urgent.priority = 5
    urgent = stub.SubmitJob(pb.SubmitJobRequest(spec=urgent), timeout=30)
    held = "training.max_running_jobs is 0: jobs stay queued until it is raised"
    assert stub.GetJob(pb.GetJobRequest(job_id=urgent.id), timeout=10).waiting_for == held
    behind = stub.GetJob(pb.GetJobRequest(job_id=later.id), timeout=10).waiting_for
    assert behind == "1 queued job(s) start before it; " + held, behind
    listed = {j.id: j.waiting_for for j in stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs}
    assert listed == {urgent.id: held, later.id: behind}, listed
    shown = subprocess.run([str(BUILD / "clients" / "loradctl"), "--address", d.grpc_address,
                            "train", "show", later.id], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and f"waiting for: {behind}\n" in shown.stdout, shown
    stub.CancelJob(pb.CancelJobRequest(job_id=later.id), timeout=10)
    assert stub.GetJob(pb.GetJobRequest(job_id=later.id), timeout=10).waiting_for == ""


def test_list_filters_and_paginates(service):
    _, stub, pb, _ = service
    ids = [stub.SubmitJob(pb.SubmitJobRequest(spec=spec(pb)), timeout=30).id for _ in range(3)]
    stub.CancelJob(pb.CancelJobRequest(job_id=ids[0]), timeout=10)
    page = stub.ListJobs(pb.ListJobsRequest(page_size=2), timeout=10)
    assert [j.id for j in page.jobs] == [ids[2], ids[1]] and page.next_page_token
    rest = stub.ListJobs(pb.ListJobsRequest(page_size=2, page_token=page.next_page_token), timeout=10)
    assert [j.id for j in rest.jobs] == [ids[0]] and not rest.next_page_token
    cancelled = stub.ListJobs(pb.ListJobsRequest(states=[pb.JOB_STATE_CANCELLED]), timeout=10)
    assert [j.id for j in cancelled.jobs] == [ids[0]]
    # A page size past the most (500) is that most, as AIP-158 has it (it was refused); a
    # negative one is refused naming it.
    big = stub.ListJobs(pb.ListJobsRequest(page_size=100000), timeout=10)
    assert [j.id for j in big.jobs][:3] == [ids[2], ids[1], ids[0]] and not big.next_page_token
    with pytest.raises(grpc.RpcError) as err:
        stub.ListJobs(pb.ListJobsRequest(page_size=-1), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("page_size: "), err.value.details()
    # Lists leave inline examples out (a page of them could reach gigabytes); GetJob has them.
    inline = spec(pb)
    inline.dataset.path = ""
    for i in range(16):
        inline.dataset.inline_examples.add(json=f'{{"question": "q{i}", "answer": "a{i}"}}')
    job = stub.SubmitJob(pb.SubmitJobRequest(spec=inline), timeout=30)
    listed = stub.ListJobs(pb.ListJobsRequest(page_size=1), timeout=10).jobs[0]
    assert listed.id == job.id and len(listed.spec.dataset.inline_examples) == 0
    assert listed.spec.adapter_name == inline.adapter_name
    got = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10)
    assert len(got.spec.dataset.inline_examples) == 16


def test_watch_streams_history_then_live_cancellation(service):
    d, stub, pb, _ = service
    job = stub.SubmitJob(pb.SubmitJobRequest(spec=spec(pb)), timeout=30)
    # A watch whose deadline passes (the job stays queued) ends DEADLINE_EXCEEDED, and is counted
    # so, not as CANCELLED.
    with pytest.raises(grpc.RpcError) as err:
        list(stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    watch = 'method="lorad.v1.TrainingService/WatchJob"'
    for _ in range(50):  # the server finishes the call just after the client gave up
        metrics = d.http_get("/metrics")[1]
        if f'{{{watch},code="DEADLINE_EXCEEDED"}} 1' in metrics:
            break
        threading.Event().wait(0.1)
    assert f'{{{watch},code="DEADLINE_EXCEEDED"}} 1' in metrics, metrics
    assert f'{{{watch},code="CANCELLED"}}' not in metrics
    events = []
    stream = stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=30)

    def consume():
        for event in stream:
            events.append(event)

    reader = threading.Thread(target=consume)
    reader.start()
    # The first event (history) arrives before we cancel, so cancellation is seen live.
    for _ in range(100):
        if events:
            break
        threading.Event().wait(0.05)
    stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=10)
    reader.join(timeout=20)
    assert not reader.is_alive(), "WatchJob did not end after the job was cancelled"
    assert [e.state for e in events] == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_CANCELLED]
    # Watching a finished job replays its history and ends.
    replay = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=10))
    assert [e.state for e in replay] == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_CANCELLED]
    # Cancelling again changes nothing.
    assert stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=10).state == pb.JOB_STATE_CANCELLED
    # The log tells the job's story (it said nothing of a job until its deletion): queued with its
    # steps and dataset, and cancelled, once.
    log = d.log()
    assert f"job {job.id} (qa-bot) queued: 2 step(s) on " in log and "qa.jsonl" in log, log
    assert log.count(f"job {job.id} (qa-bot) cancelled") == 1, log


def test_watch_replays_a_long_history_in_order_from_any_step(tmp_path, stubs):
    """A job of 2,500 steps (more than one page of the history the stream reads at a time) with
    an evaluation every 100 steps, written into the job database as the job runner writes them:
    the watch replays every step once, in order, each evaluation right after its step."""
    import sqlite3

    pb = stubs.training_pb2
    d = start_daemon(tmp_path, *HOLD_JOBS)
    dataset_root(tmp_path)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            job = stub.SubmitJob(pb.SubmitJobRequest(spec=spec(pb)), timeout=30)
            stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=10)
    finally:
        stop_daemon(d)
    steps = 2500
    with sqlite3.connect(tmp_path / "data" / "jobs.db") as db:
        db.executemany(
            "INSERT INTO job_steps (job_id, step, epoch, loss, learning_rate, grad_norm, "
            "tokens_per_second, step_seconds, elapsed_seconds, eta_seconds, time_ms) "
            "VALUES (?, ?, 0, ?, 0.0002, 1, 100, 0.1, ?, 0, ?)",
            [(job.id, n, 1.0 / n, 0.1 * n, 1_700_000_000_000 + n) for n in range(1, steps + 1)])
        for n in range(100, steps + 1, 100):
            event = pb.JobEvent(job_id=job.id, eval=pb.EvalMetrics(step=n, validation_loss=2.0 / n))
            db.execute("INSERT INTO job_events (job_id, step, kind, event) VALUES (?, ?, ?, ?)",
                       (job.id, n, pb.JobEvent.DESCRIPTOR.fields_by_name["eval"].number,
                        event.SerializeToString()))
    d = start_daemon(tmp_path, *HOLD_JOBS)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            for from_step in (0, 1001, 2500):
                events = list(stub.WatchJob(
                    pb.WatchJobRequest(job_id=job.id, from_step=from_step), timeout=60))
                first = max(from_step, 1)
                expected = [("state", pb.JOB_STATE_QUEUED)]
                for n in range(first, steps + 1):
                    expected.append(("step", n))
                    if n % 100 == 0:
                        expected.append(("eval", n))
                expected.append(("state", pb.JOB_STATE_CANCELLED))
                got = [(e.WhichOneof("event"),
                        e.state if e.HasField("state") else
                        e.step.step if e.HasField("step") else e.eval.step) for e in events]
                assert got == expected, (from_step, got[:5], got[-5:])
                assert [e.step.loss for e in events if e.HasField("step")][:1] == [1.0 / first]
            # GetJob's last step is the job's latest, read alone.
            assert stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).last_step.step == steps
    finally:
        stop_daemon(d)


def expect_code(call, code, *words):
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in err.value.details(), err.value.details()


def test_bad_specs_are_invalid_argument_naming_the_field(service):
    _, stub, pb, root = service
    submit = lambda s: (lambda: stub.SubmitJob(pb.SubmitJobRequest(spec=s), timeout=30))
    bad_name = spec(pb)
    bad_name.adapter_name = "../evil"
    expect_code(submit(bad_name), grpc.StatusCode.INVALID_ARGUMENT, "adapter_name")
    # A huge value is quoted shortened: the status still fits the client's header limit.
    bad_name.adapter_name = "a" * 100_000
    expect_code(submit(bad_name), grpc.StatusCode.INVALID_ARGUMENT, "adapter_name", "left out")
    unpacked = spec(pb)
    unpacked.dataset.packing_separate = True
    expect_code(submit(unpacked), grpc.StatusCode.INVALID_ARGUMENT, "dataset.packing_separate",
                "dataset.packing: true")
    bad_lr = spec(pb)
    bad_lr.training.learning_rate = 5
    expect_code(submit(bad_lr), grpc.StatusCode.INVALID_ARGUMENT, "training.learning_rate")
    # A value just out of range reads so (6 digits showed 1.0000001 as "1", in range).
    bad_lr.training.learning_rate = 1.0000001
    expect_code(submit(bad_lr), grpc.StatusCode.INVALID_ARGUMENT,
                "training.learning_rate: 1.0000001 is out of range [1e-10, 1]")
    bad_keep = spec(pb)
    bad_keep.training.keep_activations_layers = -1
    expect_code(submit(bad_keep), grpc.StatusCode.INVALID_ARGUMENT,
                "training.keep_activations_layers")
    bad_rank = spec(pb)
    bad_rank.lora.r = 5000
    expect_code(submit(bad_rank), grpc.StatusCode.INVALID_ARGUMENT, "lora.r:", "1024")
    bad_alpha = spec(pb)
    bad_alpha.lora.alpha = 1e308  # would overflow at the first step
    expect_code(submit(bad_alpha), grpc.StatusCode.INVALID_ARGUMENT, "lora.alpha:")
    too_many = spec(pb)
    too_many.training.keep_activations_layers = 3  # the tiny model has 2
    expect_code(submit(too_many), grpc.StatusCode.INVALID_ARGUMENT,
                "training.keep_activations_layers", "[0, 2]")
    too_many_mlp = spec(pb)
    too_many_mlp.training.keep_mlp_layers = 3
    expect_code(submit(too_many_mlp), grpc.StatusCode.INVALID_ARGUMENT,
                "training.keep_mlp_layers", "[0, 2]")
    kept_twice = spec(pb)
    kept_twice.training.keep_activations_layers = 1
    kept_twice.training.keep_mlp_layers = 2  # with one layer kept, one is checkpointed
    expect_code(submit(kept_twice), grpc.StatusCode.INVALID_ARGUMENT,
                "training.keep_mlp_layers", "more than the model's 2 layers")
    mlp_without_checkpoints = spec(pb)
    mlp_without_checkpoints.training.gradient_checkpointing = False
    mlp_without_checkpoints.training.keep_mlp_layers = 1
    expect_code(submit(mlp_without_checkpoints), grpc.StatusCode.INVALID_ARGUMENT,
                "training.keep_mlp_layers", "gradient_checkpointing")
    no_checkpoints = spec(pb)
    no_checkpoints.training.gradient_checkpointing = False
    no_checkpoints.training.offload_activations = True
    expect_code(submit(no_checkpoints), grpc.StatusCode.INVALID_ARGUMENT,
                "training.offload_activations", "gradient_checkpointing")
    bad_target = spec(pb)
    bad_target.lora.target_modules.append("attn")
    expect_code(submit(bad_target), grpc.StatusCode.INVALID_ARGUMENT, "target_modules", "attn")
    (root / "broken.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": 1}\n')
    broken = spec(pb)
    broken.dataset.path = "broken.jsonl"
    expect_code(submit(broken), grpc.StatusCode.INVALID_ARGUMENT, "dataset.path", "broken.jsonl:2")
    missing = spec(pb)
    missing.dataset.path = "nope.jsonl"
    expect_code(submit(missing), grpc.StatusCode.INVALID_ARGUMENT, "dataset.path", "nope.jsonl")
    inline = spec(pb)
    inline.dataset.path = ""
    inline.dataset.inline_examples.add(json='{"prompt": "p"}')
    expect_code(submit(inline), grpc.StatusCode.INVALID_ARGUMENT, "inline_examples[0]", "completion")
    # Files that are not regular files: a named pipe would block the reader for ever.
    os.mkfifo(root / "pipe.jsonl")
    (root / "folder.jsonl").mkdir()
    for name, words in [("pipe.jsonl", ["named pipe"]), ("folder.jsonl", ["a directory"])]:
        odd = spec(pb)
        odd.dataset.path = name
        expect_code(submit(odd), grpc.StatusCode.INVALID_ARGUMENT, "dataset.path", *words)
    # Numbers an enum does not name, and fields that need others, are refused at submission
    # rather than when the job starts.
    for field, value, word in [("schedule", 99, "training.schedule"),
                               ("optimizer", 7, "training.optimizer")]:
        odd = spec(pb)
        setattr(odd.training, field, value)
        expect_code(submit(odd), grpc.StatusCode.INVALID_ARGUMENT, word, str(value))
    odd = spec(pb)
    odd.dataset.format = 42
    expect_code(submit(odd), grpc.StatusCode.INVALID_ARGUMENT, "dataset.format", "42")
    no_split = spec(pb)
    no_split.training.eval_every = 1
    expect_code(submit(no_split), grpc.StatusCode.INVALID_ARGUMENT, "eval_every", "validation")
    no_eval = spec(pb)
    no_eval.training.early_stopping_patience = 2
    no_eval.dataset.validation_fraction = 0.25
    expect_code(submit(no_eval), grpc.StatusCode.INVALID_ARGUMENT, "early_stopping_patience")
    both = spec(pb)
    both.dataset.validation_fraction = 0.25
    both.dataset.validation_path = "qa.jsonl"
    expect_code(submit(both), grpc.StatusCode.INVALID_ARGUMENT, "validation_fraction", "not both")
    # One inline example cannot be split; an unknown template is named.
    tiny = spec(pb)
    tiny.dataset.path = ""
    tiny.dataset.inline_examples.add(json='{"question": "q", "answer": "a"}')
    tiny.dataset.validation_fraction = 0.2
    expect_code(submit(tiny), grpc.StatusCode.INVALID_ARGUMENT, "dataset.validation_fraction",
                "1 examples leaves none")
    both_warmups = spec(pb)
    both_warmups.training.warmup_ratio = 0.1
    both_warmups.training.warmup_steps = 3
    expect_code(submit(both_warmups), grpc.StatusCode.INVALID_ARGUMENT, "training.warmup_ratio",
                "not both")
    best = spec(pb)
    best.training.load_best_at_end = True
    expect_code(submit(best), grpc.StatusCode.INVALID_ARGUMENT, "load_best_at_end", "eval_every")
    odd = spec(pb)
    odd.dataset.template = "gemma"
    expect_code(submit(odd), grpc.StatusCode.INVALID_ARGUMENT, "dataset.template", "'gemma'", "raw")
    # Data the job would refuse at its start is refused at submission, naming the file and line:
    # a conversation the Alpaca template cannot take, a file whose answers all get cut away.
    (root / "multi-turn.jsonl").write_text(
        '{"question": "q", "answer": "a"}\n'
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},'
        ' {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}\n')
    alpaca = spec(pb)
    alpaca.dataset.path = "multi-turn.jsonl"
    alpaca.dataset.template = "alpaca"
    expect_code(submit(alpaca), grpc.StatusCode.INVALID_ARGUMENT, "dataset:", "multi-turn.jsonl:2",
                "alpaca")
    (root / "long.jsonl").write_text('{"question": "' + "word " * 100 + '", "answer": "x"}\n')
    cut = spec(pb)
    cut.dataset.path = "long.jsonl"
    cut.training.max_seq_length = 16
    expect_code(submit(cut), grpc.StatusCode.INVALID_ARGUMENT, "long.jsonl",
                "no usable training example")
    inline_cut = spec(pb)
    inline_cut.dataset.path = ""
    inline_cut.dataset.inline_examples.add(json='{"question": "' + "word " * 100 + '", "answer": "x"}')
    inline_cut.training.max_seq_length = 16
    expect_code(submit(inline_cut), grpc.StatusCode.INVALID_ARGUMENT,
                "dataset.inline_examples: no usable training example")
    # An inline record is named as the request has it, not by the job's scratch file.
    inline_turns = spec(pb)
    inline_turns.dataset.path = ""
    inline_turns.dataset.template = "alpaca"
    for line in (root / "multi-turn.jsonl").read_text().splitlines():
        inline_turns.dataset.inline_examples.add(json=line)
    expect_code(submit(inline_turns), grpc.StatusCode.INVALID_ARGUMENT,
                "dataset.inline_examples[1]: ", "alpaca")


def test_paths_outside_the_dataset_root_are_permission_denied(service):
    _, stub, pb, root = service
    outside = root.parent.parent / "outside.jsonl"
    shutil.copy(QA, outside)
    os.symlink(outside, root / "link.jsonl")
    for path in ["../../outside.jsonl", str(outside), "link.jsonl"]:
        s = spec(pb)
        s.dataset.path = path
        expect_code(lambda: stub.SubmitJob(pb.SubmitJobRequest(spec=s), timeout=30),
                    grpc.StatusCode.PERMISSION_DENIED, "dataset.path")


def test_unknown_job_is_not_found(service):
    _, stub, pb, _ = service
    expect_code(lambda: stub.GetJob(pb.GetJobRequest(job_id="x" * 10000), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT, "job_id", "10000 characters")
    expect_code(lambda: stub.GetJob(pb.GetJobRequest(job_id="job-0"), timeout=10),
                grpc.StatusCode.NOT_FOUND, "job-0")
    expect_code(lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id="job-0"), timeout=10)),
                grpc.StatusCode.NOT_FOUND)
    expect_code(lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id="job-0", from_step=-1),
                                           timeout=10)),
                grpc.StatusCode.INVALID_ARGUMENT, "from_step")
    expect_code(lambda: stub.GetJob(pb.GetJobRequest(), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT, "job_id")


def test_deletes_and_adapter_loads_do_not_wait_behind_submissions(tmp_path, stubs):
    """Submissions check their dataset on two threads (a large one takes a minute); DeleteJob and
    LoadAdapter, an operator's calls, ran on the same two and waited behind every queued
    submission (a hot swap with a 10 s deadline failed). They have their own now: both answer
    while the submissions are still being checked."""
    from concurrent.futures import ThreadPoolExecutor

    d = start_daemon(tmp_path, *HOLD_JOBS, "--set", "model.base_weights=none")
    root = dataset_root(tmp_path)
    lines = QA.read_text()
    (root / "big.jsonl").write_text(lines * (64 * 1024 * 1024 // len(lines)))  # ~2 s a check
    pb, apb = stubs.training_pb2, stubs.adapters_pb2
    try:
        with grpc.insecure_channel(d.grpc_address) as channel, ThreadPoolExecutor(6) as pool:
            train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
            submissions = [pool.submit(train.SubmitJob, pb.SubmitJobRequest(spec=pb.JobSpec(
                adapter_name=f"big-{i}", dataset=pb.DatasetSpec(path="big.jsonl"))), timeout=300)
                for i in range(6)]
            while not any(f.running() for f in submissions):
                pass
            with pytest.raises(grpc.RpcError) as deleted:
                train.DeleteJob(pb.DeleteJobRequest(job_id="job-none"), timeout=120)
            with pytest.raises(grpc.RpcError) as loaded:
                adapters.LoadAdapter(apb.LoadAdapterRequest(name="x", path="missing"), timeout=120)
            waiting = sum(not f.done() for f in submissions)
            assert all(f.result().id for f in submissions)
        assert deleted.value.code() == grpc.StatusCode.NOT_FOUND, deleted.value
        assert loaded.value.code() == grpc.StatusCode.NOT_FOUND, loaded.value
        assert waiting >= 2, f"the calls were answered after all but {waiting} submissions"
    finally:
        stop_daemon(d)


def test_delete_job_removes_only_ended_jobs(service):
    _, stub, pb, _ = service
    queued = stub.SubmitJob(pb.SubmitJobRequest(spec=spec(pb)), timeout=30)
    kept = stub.SubmitJob(pb.SubmitJobRequest(spec=spec(pb)), timeout=30)
    expect_code(lambda: stub.DeleteJob(pb.DeleteJobRequest(job_id=queued.id), timeout=10),
                grpc.StatusCode.FAILED_PRECONDITION, queued.id, "queued", "cancel it first")
    stub.CancelJob(pb.CancelJobRequest(job_id=queued.id), timeout=10)
    assert stub.DeleteJob(pb.DeleteJobRequest(job_id=queued.id), timeout=10) == \
        pb.DeleteJobResponse()
    expect_code(lambda: stub.GetJob(pb.GetJobRequest(job_id=queued.id), timeout=10),
                grpc.StatusCode.NOT_FOUND, queued.id)
    expect_code(lambda: stub.DeleteJob(pb.DeleteJobRequest(job_id=queued.id), timeout=10),
                grpc.StatusCode.NOT_FOUND, queued.id)
    expect_code(lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id=queued.id), timeout=10)),
                grpc.StatusCode.NOT_FOUND)
    expect_code(lambda: stub.DeleteJob(pb.DeleteJobRequest(), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT, "job_id")
    listed = stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs
    assert [j.id for j in listed] == [kept.id]
    assert listed[0].state == pb.JOB_STATE_QUEUED


def test_full_queue_is_resource_exhausted_and_jobs_survive_a_restart(tmp_path, stubs):
    pb = stubs.training_pb2
    config = tmp_path / "lorad.yaml"
    config.write_text("limits:\n  max_queued_jobs: 2\ntraining:\n  max_running_jobs: 0\n")
    d = start_daemon(tmp_path, config=config)
    dataset_root(tmp_path)
    ids = []
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            ids = [stub.SubmitJob(pb.SubmitJobRequest(spec=spec(pb)), timeout=30).id for _ in range(2)]
            expect_code(lambda: stub.SubmitJob(pb.SubmitJobRequest(spec=spec(pb)), timeout=30),
                        grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")
        status, text = d.http_get("/metrics")
        assert 'lorad_jobs{state="queued"} 2' in text
    finally:
        stop_daemon(d)
    d = start_daemon(tmp_path, config=config)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            listed = stub.ListJobs(pb.ListJobsRequest(), timeout=10)
            assert sorted(j.id for j in listed.jobs) == sorted(ids)
            assert all(j.state == pb.JOB_STATE_QUEUED for j in listed.jobs)
    finally:
        stop_daemon(d)
