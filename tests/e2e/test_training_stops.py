"""A training job across stops of the real daemon (tiny fixture model): a kill -9 resumes from
the checkpoint with the same losses, a job that keeps killing the daemon is failed (and retried),
and a Ctrl-C mid-step writes the checkpoint the next start resumes from."""
import re
import signal
import time

import grpc
import pytest

from conftest import start_daemon, stop_daemon
from test_training_end_to_end import job_spec, prepare, wait_for_state, watch_until_done


def test_kill_9_during_a_job_resumes_from_its_checkpoint_with_the_same_final_loss(tmp_path, stubs):
    tpb = stubs.training_pb2
    spec = job_spec(tpb, "crash", 16, save_every=4)

    # The uninterrupted run.
    prepare(tmp_path / "a")
    d = start_daemon(tmp_path / "a")
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            job = stub.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=30)
            _, states, steps = watch_until_done(stub, tpb, job.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
            reference = [s.loss for s in steps]
    finally:
        stop_daemon(d)

    # The same job, killed after its second checkpoint.
    prepare(tmp_path / "b")
    d = start_daemon(tmp_path / "b")
    with grpc.insecure_channel(d.grpc_address) as channel:
        stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        job = stub.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=30)
        checkpoint, last = 0, 0
        for event in stub.WatchJob(tpb.WatchJobRequest(job_id=job.id), timeout=120):
            if event.WhichOneof("event") == "checkpoint":
                checkpoint = event.checkpoint.step
            last = max(last, event.step.step)
            if checkpoint >= 8 and last > checkpoint:  # steps past it recorded (and sent)
                break
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    folder = tmp_path / "b" / "data" / "jobs" / job.id
    resumes_at = max(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")
                     if (p / "trainer_state.json").exists())

    # Held in the queue (training.max_running_jobs 0), the job shows no step past the checkpoint
    # it resumes from: the dead run's later steps were lost with it (a watch of the resumed run
    # then skipped its steps up to the dead run's last, taking them for ones it had sent).
    d = start_daemon(tmp_path / "b", "--set", "training.max_running_jobs=0")
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            queued = stub.GetJob(tpb.GetJobRequest(job_id=job.id), timeout=10)
            assert queued.state == tpb.JOB_STATE_QUEUED
            assert last > resumes_at >= 8 and queued.last_step.step == resumes_at, \
                (last, resumes_at, queued.last_step)
    finally:
        stop_daemon(d)

    d = start_daemon(tmp_path / "b")
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            events, states, steps = watch_until_done(stub, tpb, job.id)
            assert [s.step for s in steps] == list(range(1, 17)), "each step once, in order"
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
            kinds = [e.WhichOneof("event") for e in events]
            assert kinds.count("finished") == 1 and states.count(tpb.JOB_STATE_SUCCEEDED) == 1
            checkpoints = [e.checkpoint.step for e in events if e.HasField("checkpoint")]
            assert checkpoints == [4, 8, 12, 16], "each checkpoint once, in order, across the kill"
            summary = stub.GetJob(tpb.GetJobRequest(job_id=job.id), timeout=10).summary
            assert summary.steps == 16 and summary.adapter_name == "crash"
            by_step = {s.step: s.loss for s in steps}
            assert sorted(by_step) == list(range(1, 17)), "no step lost or repeated"
            resumed = [by_step[i] for i in range(1, 17)]
            assert resumed == pytest.approx(reference, rel=1e-5)
            assert len(stub.ListJobs(tpb.ListJobsRequest(), timeout=10).jobs) == 1
    finally:
        stop_daemon(d)


def test_a_job_running_at_three_deaths_of_the_daemon_fails_instead_of_starting_again(
        tmp_path, stubs):
    """A job that kills the daemon (a CUDA fault, the out-of-memory killer) was queued again and
    started at every start, killing each one for good: after three deaths while it ran, in a row
    without it getting further than its furthest step, the next start fails it and says why. The
    first life trains to step 100 (no checkpoint: the next ones start again from step 1); the
    next two die as soon as the job runs again, far short of step 100."""
    tpb = stubs.training_pb2
    prepare(tmp_path)
    job_id = None
    for death in range(3):
        d = start_daemon(tmp_path)
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            if job_id is None:
                job_id = stub.SubmitJob(
                    tpb.SubmitJobRequest(spec=job_spec(tpb, "crasher", 100000)), timeout=30).id
                for event in stub.WatchJob(tpb.WatchJobRequest(job_id=job_id), timeout=120):
                    if event.WhichOneof("event") == "step" and event.step.step >= 100:
                        break
            else:
                wait_for_state(stub, tpb, job_id, tpb.JOB_STATE_RUNNING)
        d.proc.send_signal(signal.SIGKILL)  # the daemon dies under the job
        d.proc.wait()
        if death > 0:
            assert "did not stop cleanly" in d.log(), d.log()
            assert f"job {job_id} was running at the last stop; queued again" in d.log()

    d = start_daemon(tmp_path)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            job = stub.GetJob(tpb.GetJobRequest(job_id=job_id), timeout=10)
            assert job.state == tpb.JOB_STATE_FAILED, d.log()
            assert "3 times while this job was running" in job.error, job.error
            assert re.search(r"no further than step (\d+)", job.error), job.error
            assert int(re.search(r"step (\d+)", job.error).group(1)) >= 100
            assert "RetryJob (loradctl train retry) resumes the job" in job.error
            _, states, _ = watch_until_done(stub, tpb, job_id, timeout=30)
            assert states[-1] == tpb.JOB_STATE_FAILED
            assert f"job {job_id} failed: " in d.log()
            assert f"job {job_id} (crasher) started" not in d.log(), "it was started again"
            # Once the cause is fixed: retried, it runs again, its error gone.
            retried = stub.RetryJob(tpb.RetryJobRequest(job_id=job_id), timeout=10)
            assert retried.state == tpb.JOB_STATE_QUEUED and retried.error == ""
            wait_for_state(stub, tpb, job_id, tpb.JOB_STATE_RUNNING)
            # The runner logs the start just after it records it as running.
            started_again = f"job {job_id} (crasher) started again from its first step"
            for _ in range(300):
                if started_again in d.log():
                    break
                time.sleep(0.1)
            assert started_again in d.log()
            with pytest.raises(grpc.RpcError) as err:  # not while it runs
                stub.RetryJob(tpb.RetryJobRequest(job_id=job_id), timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "is running; only a failed or cancelled job is retried" in err.value.details()
            stub.CancelJob(tpb.CancelJobRequest(job_id=job_id), timeout=10)
    finally:
        assert stop_daemon(d) == 0, d.log()


def test_ctrl_c_mid_step_writes_a_checkpoint_the_next_start_resumes_from(tmp_path, stubs):
    """Ctrl-C while a job is between micro-batches of a step (grad_accum 4): the step is finished
    and checkpointed, the queued job is not started on the way out, and the next start resumes
    from that checkpoint."""
    tpb = stubs.training_pb2
    spec = job_spec(tpb, "ctrl-c", 100000)
    spec.training.grad_accum = 4
    prepare(tmp_path)
    d = start_daemon(tmp_path)
    with grpc.insecure_channel(d.grpc_address) as channel:
        stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        job = stub.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=30)
        queued = stub.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "queued", 5)), timeout=30)
        for event in stub.WatchJob(tpb.WatchJobRequest(job_id=job.id), timeout=120):
            if event.WhichOneof("event") == "step" and event.step.step >= 2:
                break
    assert stop_daemon(d, signal.SIGINT) == 0
    first_log = d.log()
    checkpoints = sorted((tmp_path / "data" / "jobs" / job.id).glob("checkpoint-*"))
    assert checkpoints, first_log
    # The job checkpoints before the RPCs' grace period, which a container's stop timeout
    # (docker: 10 s, the default grace) may not outlast.
    stopped = first_log.find("training stopped: 1 active job(s)")
    assert 0 <= stopped < first_log.find("draining: in-flight RPCs"), first_log
    assert f"job {queued.id} (queued) started" not in first_log

    d = start_daemon(tmp_path)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            wait_for_state(stub, tpb, job.id, tpb.JOB_STATE_RUNNING)
            deadline = time.time() + 60
            while f"resuming from {checkpoints[-1]}" not in d.log() and time.time() < deadline:
                time.sleep(0.1)
            assert f"resuming from {checkpoints[-1]}" in d.log(), d.log()
            stub.CancelJob(tpb.CancelJobRequest(job_id=job.id), timeout=10)
    finally:
        stop_daemon(d)


def test_a_second_ctrl_c_is_not_counted_as_a_death_of_the_running_job(tmp_path, stubs):
    """A second stop signal exits at once, without the clean shutdown. The job database still said
    the daemon ran jobs, so the next start counted the stop as a death of the running job, and
    three impatient double Ctrl-Cs failed a job that never crashed anything. The steps here are
    long (64 examples of 256 tokens, 8 micro-batches a step) so the second signal lands while the
    first waits for the step to end."""
    import json
    import sqlite3

    tpb = stubs.training_pb2
    root = tmp_path / "data" / "datasets"
    root.mkdir(parents=True)
    with open(root / "long.jsonl", "w") as f:
        for i in range(64):
            words = " ".join(f"w{(i * 7 + k) % 97}" for k in range(400))
            f.write(json.dumps({"question": f"Say the list {i}.", "answer": words}) + "\n")
    spec = job_spec(tpb, "double-ctrl-c", 1000)
    spec.dataset.path = "long.jsonl"
    spec.training.max_seq_length = 256
    spec.training.micro_batch_size = 8
    spec.training.grad_accum = 8
    d = start_daemon(tmp_path)
    with grpc.insecure_channel(d.grpc_address) as channel:
        stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        job = stub.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=30)
        for event in stub.WatchJob(tpb.WatchJobRequest(job_id=job.id), timeout=300):
            if event.WhichOneof("event") == "step":
                break
    d.proc.send_signal(signal.SIGINT)
    deadline = time.time() + 30
    while "shutting down" not in d.log() and time.time() < deadline:
        time.sleep(0.01)
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(timeout=30) != 0
    log = d.log()
    assert "second stop signal: exiting now" in log, log
    assert "the forced stop is recorded: not counted as a crash" in log, log
    # The second signal cut the shutdown short (else this test would prove nothing).
    assert "training stopped:" not in log, log
    with sqlite3.connect(tmp_path / "data" / "jobs.db") as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'daemon_running'").fetchall() == []

    d = start_daemon(tmp_path)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            wait_for_state(stub, tpb, job.id, tpb.JOB_STATE_RUNNING)
            stub.CancelJob(tpb.CancelJobRequest(job_id=job.id), timeout=10)
    finally:
        stop_daemon(d)
    with sqlite3.connect(tmp_path / "data" / "jobs.db") as conn:
        stops = conn.execute("SELECT unclean_stops FROM jobs WHERE id = ?", (job.id,)).fetchone()
    assert stops == (0,)
