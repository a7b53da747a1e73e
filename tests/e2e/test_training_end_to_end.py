"""The product flow with a real client against the real daemon (tiny fixture model, NF4 base as
QLoRA): submit a fine-tuning job, watch its loss step by step, see the adapter published, chat
with it while a second job trains, scrape the metrics, cancel; jobs across restarts, deletion,
continued adapters (stops and crashes: test_training_stops.py; merged exports:
test_merged_export.py)."""
import math
import re
import shutil
import socket
import threading
import time

import grpc
import pytest

from conftest import ROOT, start_daemon, stop_daemon

QA = ROOT / "tests/fixtures/qa_small.jsonl"


def job_spec(pb, name, steps, save_every=0, lr=2e-3):
    return pb.JobSpec(
        adapter_name=name,
        dataset=pb.DatasetSpec(path="qa.jsonl"),
        lora=pb.LoraSpec(r=8, alpha=16),
        training=pb.TrainingSpec(max_steps=steps, micro_batch_size=2, grad_accum=1,
                                 learning_rate=lr, warmup_steps=0, max_seq_length=128,
                                 optimizer=pb.OPTIMIZER_ADAMW, save_every=save_every, seed=11))


def prepare(tmp_path):
    root = tmp_path / "data" / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(QA, root / "qa.jsonl")


def watch_until_done(stub, pb, job_id, timeout=300):
    events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout))
    states = [e.state for e in events if e.WhichOneof("event") == "state"]
    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    return events, states, steps


def wait_for_state(stub, pb, job_id, state, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)
        if job.state == state:
            return job
        time.sleep(0.05)
    pytest.fail(f"job {job_id} did not reach state {state}")


def test_train_watch_publish_chat_while_training_metrics_cancel(tmp_path, stubs):
    tpb, ipb, apb = stubs.training_pb2, stubs.inference_pb2, stubs.adapters_pb2
    prepare(tmp_path)
    d = start_daemon(tmp_path)
    try:
        channel = grpc.insecure_channel(d.grpc_address)
        train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        infer = stubs.inference_pb2_grpc.InferenceServiceStub(channel)
        adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)

        job = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "qa-bot", 12)), timeout=30)
        events, states, steps = watch_until_done(train, tpb, job.id)
        assert states[0] == tpb.JOB_STATE_QUEUED and states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
        assert [s.step for s in steps] == list(range(1, 13))
        assert {s.total_steps for s in steps} == {12}  # the trainer's count, in every step
        losses = [s.loss for s in steps]
        assert all(loss > 0 for loss in losses)
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"loss did not fall: {losses}"
        assert all(s.learning_rate > 0 and s.tokens_per_second > 0 for s in steps)
        finished = [e.finished for e in events if e.WhichOneof("event") == "finished"]
        assert finished and finished[0].adapter_name == "qa-bot" and finished[0].adapter_version == 1
        assert finished[0].final_loss == pytest.approx(losses[-1])
        assert finished[0].steps == 12 and finished[0].runtime_seconds > 0

        # The job's record keeps it all: a later watch replays the same events, each once, with
        # the same times, and GetJob carries the summary.
        replay, _, _ = watch_until_done(train, tpb, job.id)
        assert all(e.time.seconds > 0 for e in replay)
        assert replay == events
        assert train.GetJob(tpb.GetJobRequest(job_id=job.id), timeout=10).summary == finished[0]

        listed = adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters
        assert [(a.name, a.version, a.rank) for a in listed] == [("qa-bot", 1, 8)]
        assert listed[0].source_job_id == job.id
        assert finished[0].trained_tokens > 0

        # A second, longer job trains while we chat with the first job's adapter.
        long_job = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "qa-bot-2", 400)),
                                   timeout=30)
        wait_for_state(train, tpb, long_job.id, tpb.JOB_STATE_RUNNING)
        queued = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "later", 5)), timeout=30)
        t0 = time.time()
        chunks = list(infer.Chat(ipb.ChatRequest(
            messages=[ipb.ChatMessage(role="user", content="What is the capital of France?")],
            adapter="qa-bot", sampling=ipb.SamplingParams(max_new_tokens=8)), timeout=120))
        assert chunks and chunks[-1].finish_reason in (
            ipb.FINISH_REASON_LENGTH, ipb.FINISH_REASON_EOS, ipb.FINISH_REASON_STOP)
        assert "<|im_end|>" not in "".join(c.text for c in chunks)
        assert chunks[-1].adapter == "qa-bot"
        ttft = chunks[-1].usage.time_to_first_token_seconds
        print(f"chat while training: time to first token {ttft * 1000:.1f} ms, "
              f"whole reply {(time.time() - t0) * 1000:.1f} ms")
        assert train.GetJob(tpb.GetJobRequest(job_id=long_job.id), timeout=10).state == \
            tpb.JOB_STATE_RUNNING, "the chat should have run while the job trained"

        # Metrics: the running job's loss and the token counters.
        deadline = time.time() + 30
        while time.time() < deadline:
            status, body = d.http_get("/metrics")
            if f'lorad_job_loss{{job_id="{long_job.id}"' in body:
                break
            time.sleep(0.1)
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(body)}
        loss = [s for s in families["lorad_job_loss"].samples if s.labels["job_id"] == long_job.id]
        assert loss and loss[0].value > 0
        gen = [s for s in families["lorad_generation_tokens"].samples
               if s.name == "lorad_generation_tokens_total"]
        assert gen and gen[0].value >= len([t for c in chunks for t in c.tokens])
        assert any(s.value > 0 for s in families["lorad_train_tokens"].samples)
        jobs = {s.labels["state"]: s.value for s in families["lorad_jobs"].samples}
        assert jobs.get("succeeded") == 1 and jobs.get("running") == 1 and jobs.get("queued") == 1

        # Cancel the queued job, then the running one, which a live watch follows: the step the
        # engine was in when the cancel came is not added after the cancelled state (the live
        # watch ends there), so a replay tells the same history and GetJob the same last step.
        assert train.CancelJob(tpb.CancelJobRequest(job_id=queued.id), timeout=10).state == \
            tpb.JOB_STATE_CANCELLED
        live = []
        watcher = threading.Thread(target=lambda: live.extend(
            train.WatchJob(tpb.WatchJobRequest(job_id=long_job.id), timeout=60)))
        watcher.start()
        while not any(e.WhichOneof("event") == "step" for e in live):
            time.sleep(0.01)
        assert train.CancelJob(tpb.CancelJobRequest(job_id=long_job.id), timeout=10).state == \
            tpb.JOB_STATE_CANCELLED
        watcher.join()
        time.sleep(1)  # the engine ends the job at its next micro-batch
        replay, states, steps = watch_until_done(train, tpb, long_job.id, timeout=60)
        assert states[-1] == tpb.JOB_STATE_CANCELLED
        assert [e for e in replay if e.WhichOneof("event") == "step"] == \
            [e for e in live if e.WhichOneof("event") == "step"]
        assert train.GetJob(tpb.GetJobRequest(job_id=long_job.id), timeout=10).last_step == \
            steps[-1]
        channel.close()
    finally:
        assert stop_daemon(d) == 0, d.log()


def test_a_job_whose_folder_cannot_be_written_waits_says_why_and_ends_once_it_can(tmp_path, stubs):
    """A checkpoint that cannot be written (a full disk; here a file put where the job's folder
    was) does not fail the job: it stays running, holds what it trained, says why in a warning
    event (live and in its replayed history), and ends as usual once the folder is back."""
    tpb = stubs.training_pb2
    prepare(tmp_path)
    d = start_daemon(tmp_path)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            job = stub.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "blocked", 12, 4)),
                                 timeout=30)
            folder = tmp_path / "data" / "jobs" / job.id
            aside = folder.with_name(job.id + ".aside")
            warning = None
            for event in stub.WatchJob(tpb.WatchJobRequest(job_id=job.id), timeout=120):
                kind = event.WhichOneof("event")
                if kind == "step" and not aside.exists():
                    folder.rename(aside)
                    folder.write_text("in the way")
                if kind == "warning":
                    warning = event.warning
                    break
            assert warning is not None, d.log()
            assert "could not be written" in warning and "tries again in" in warning, warning
            assert stub.GetJob(tpb.GetJobRequest(job_id=job.id), timeout=10).state == \
                tpb.JOB_STATE_RUNNING
            folder.unlink()
            aside.rename(folder)
            events, states, steps = watch_until_done(stub, tpb, job.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
            assert sorted({s.step for s in steps}) == list(range(1, 13)), "no step lost"
            assert warning in [e.warning for e in events if e.HasField("warning")]
            assert (folder / "adapter" / "adapter_model.safetensors").exists()
        assert f"job {job.id}: " in d.log() and "could not be written" in d.log()
    finally:
        stop_daemon(d)


def test_a_queued_job_whose_folder_is_taken_by_a_file_fails_and_the_queue_goes_on(tmp_path, stubs):
    """A queued job whose folder cannot be made when its turn comes for a reason storage will not
    fix (a file where the folder goes) fails naming it, and the job queued behind it runs. (One
    that storage refuses, a full disk or a folder lorad may not write, waits instead:
    JobRunnerTest.AJobWhoseFolderStorageRefusesWaitsAndStartsOnceItCan.)"""
    tpb = stubs.training_pb2
    prepare(tmp_path)
    d = start_daemon(tmp_path)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            first = stub.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "first", 100000)),
                                   timeout=30)
            wait_for_state(stub, tpb, first.id, tpb.JOB_STATE_RUNNING)
            blocked = stub.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "blocked", 4)),
                                     timeout=30)
            behind = stub.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "behind", 4)),
                                    timeout=30)
            (tmp_path / "data" / "jobs" / blocked.id).write_text("in the way")
            stub.CancelJob(tpb.CancelJobRequest(job_id=first.id), timeout=10)
            failed = wait_for_state(stub, tpb, blocked.id, tpb.JOB_STATE_FAILED)
            assert "cannot create " in failed.error and blocked.id in failed.error, failed.error
            _, states, _ = watch_until_done(stub, tpb, behind.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
    finally:
        stop_daemon(d)


def test_two_jobs_train_at_once_with_the_losses_of_each_alone(tmp_path, stubs):
    """training.max_running_jobs: 2 trains two jobs side by side (micro-batches in turn); a third
    waits queued; each job's loss curve equals the same spec trained alone."""
    tpb = stubs.training_pb2
    prepare(tmp_path)
    d = start_daemon(tmp_path, "--set", "training.max_running_jobs=2")
    try:
        channel = grpc.insecure_channel(d.grpc_address)
        train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        solo = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "solo", 30)), timeout=30)
        _, states, solo_steps = watch_until_done(train, tpb, solo.id)
        assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()

        a = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "side-a", 30)), timeout=30)
        b = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "side-b", 30)), timeout=30)
        c = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "third", 30)), timeout=30)
        deadline = time.time() + 60
        both = False
        while time.time() < deadline and not both:
            got = {j.id: j.state for j in train.ListJobs(tpb.ListJobsRequest(), timeout=10).jobs}
            both = got[a.id] == got[b.id] == tpb.JOB_STATE_RUNNING
            if both:
                assert got[c.id] == tpb.JOB_STATE_QUEUED, "a third job must wait for a slot"
            time.sleep(0.02)
        assert both, f"the two jobs never ran at the same time:\n{d.log()}"
        status, body = d.http_get("/metrics")
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(body)}
        jobs = {s.labels["state"]: s.value for s in families["lorad_jobs"].samples}
        assert status == 200 and jobs.get("running") == 2, body
        assert train.CancelJob(tpb.CancelJobRequest(job_id=c.id), timeout=10).state == \
            tpb.JOB_STATE_CANCELLED

        results = {}
        for job in (a, b):
            _, states, steps = watch_until_done(train, tpb, job.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
            results[job.id] = [s.loss for s in steps]
        want = [s.loss for s in solo_steps]
        for job_id, losses in results.items():
            assert losses == pytest.approx(want, rel=1e-5), f"job {job_id} trained differently"
        channel.close()
    finally:
        assert stop_daemon(d) == 0, d.log()


def test_memory_budget_refuses_a_job_that_never_fits_and_queues_one_that_fits_later(tmp_path, stubs):
    """training.memory_budget_mib: a job whose estimate exceeds the budget is refused at submit
    with a message that says how much it needs, and the daemon keeps serving; with room for one
    job of two (max_running_jobs 2), the second waits queued until the first ends, then
    trains."""
    tpb = stubs.training_pb2
    first_dir, second_dir = tmp_path / "one-mib", tmp_path / "room-for-one"
    prepare(first_dir)
    d = start_daemon(first_dir, "--set", "training.memory_budget_mib=1")
    try:
        channel = grpc.insecure_channel(d.grpc_address)
        train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "too-big", 5)), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        found = re.search(r"needs about ([0-9.]+) MiB", err.value.details())
        assert found and "training.memory_budget_mib allows 1.0 MiB" in err.value.details(), \
            err.value.details()
        need_mib = float(found.group(1))
        assert need_mib > 1, err.value.details()
        assert list(train.ListJobs(tpb.ListJobsRequest(), timeout=10).jobs) == []
        channel.close()
    finally:
        assert stop_daemon(d) == 0, d.log()

    prepare(second_dir)
    budget = math.ceil(need_mib * 1.5)  # one job fits, two do not
    d = start_daemon(second_dir, "--set", "training.max_running_jobs=2",
                     "--set", f"training.memory_budget_mib={budget}")
    try:
        channel = grpc.insecure_channel(d.grpc_address)
        train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        a = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "first", 30)), timeout=30)
        b = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "second", 30)), timeout=30)
        seen_waiting = False
        said = set()  # the second's waiting_for while it waited
        deadline = time.time() + 120
        while time.time() < deadline:
            # One ListJobs answer is one snapshot of the store: two GetJob calls could straddle
            # the moment the first job ends and the second starts, and see both running.
            jobs = {j.id: j for j in train.ListJobs(tpb.ListJobsRequest(), timeout=10).jobs}
            got = {i: j.state for i, j in jobs.items()}
            assert not (got[a.id] == got[b.id] == tpb.JOB_STATE_RUNNING), \
                "two jobs ran at once beyond the memory budget"
            seen_waiting |= got[a.id] == tpb.JOB_STATE_RUNNING and got[b.id] == tpb.JOB_STATE_QUEUED
            if got[b.id] == tpb.JOB_STATE_QUEUED:
                said.add(jobs[b.id].waiting_for)
            if got[b.id] != tpb.JOB_STATE_QUEUED:
                break  # the first ended and the second started (or ended)
            time.sleep(0.02)
        assert seen_waiting, "the second job should wait queued while the first trains"
        assert any(w.startswith("it waits for training memory: it needs about ") for w in said), \
            said
        assert f"job {b.id} (second) waits for training memory: it needs about " in d.log()
        for job in (a, b):
            _, states, steps = watch_until_done(train, tpb, job.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
            assert len(steps) == 30
        first, second = (train.GetJob(tpb.GetJobRequest(job_id=j.id), timeout=10) for j in (a, b))
        assert second.started.ToMilliseconds() >= first.finished.ToMilliseconds(), \
            (first, second)
        channel.close()
    finally:
        assert stop_daemon(d) == 0, d.log()


def test_a_restart_serves_the_same_adapters_and_versions_keep_growing(tmp_path, stubs):
    """Adapters published by jobs or loaded by hand are served again after a restart, with their
    versions; an unloaded name stays unloaded; the next version of a name follows the last one.
    A second daemon on the same data folder refuses to start; a stop does not wait on a job
    watch for its whole grace period. An adapter folder or a queued job's dataset replaced by a
    link out of its root while the daemon was stopped is refused, not read."""
    import subprocess

    from conftest import LORAD, free_port, tiny_model_path

    tpb, apb = stubs.training_pb2, stubs.adapters_pb2
    prepare(tmp_path)
    d = start_daemon(tmp_path, "--set", "server.shutdown_grace_seconds=120")
    try:
        channel = grpc.insecure_channel(d.grpc_address)
        train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
        for _ in range(2):  # "keep" versions 1 and 2
            job = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "keep", 3)), timeout=30)
            _, states, _ = watch_until_done(train, tpb, job.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
        folder = tmp_path / "data" / "jobs" / job.id / "adapter"
        for copy in ("copy", "moved", "changed"):
            shutil.copytree(folder, tmp_path / "data" / "adapters" / copy)
        for name, path in (("by-hand", "copy"), ("dropped", "copy"), ("moved", "moved"),
                           ("changed", "changed")):
            adapters.LoadAdapter(apb.LoadAdapterRequest(name=name, path=path), timeout=30)
        adapters.UnloadAdapter(apb.UnloadAdapterRequest(name="dropped"), timeout=30)

        def start_another():
            return subprocess.run(
                [str(LORAD), "--config", str(ROOT / "deploy" / "lorad.yaml"), "--model",
                 tiny_model_path(), "--data-dir", str(tmp_path / "data"),
                 "--grpc-address", f"127.0.0.1:{free_port()}",
                 "--http-address", f"127.0.0.1:{free_port()}"],
                capture_output=True, text=True, timeout=120)

        second = start_another()
        assert second.returncode != 0 and "in use by another lorad" in second.stderr, second
        # With the host name: in a container the pid is the container's ("pid 1" read on the host
        # named init).
        assert f"(pid {d.proc.pid} on host {socket.gethostname()})" in second.stderr, second.stderr
        (tmp_path / "data" / "lorad.lock").unlink()  # taken for a stale pid file: still refused
        second = start_another()
        assert second.returncode != 0 and "in use by another lorad" in second.stderr, second

        # A watch on a long job is still open when the daemon stops.
        long_job = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "long", 100000)),
                                   timeout=30)
        wait_for_state(train, tpb, long_job.id, tpb.JOB_STATE_RUNNING)
        watch = train.WatchJob(tpb.WatchJobRequest(job_id=long_job.id), timeout=300)
        next(watch)
        datasets = tmp_path / "data" / "datasets"
        shutil.copy(QA, datasets / "swapped.jsonl")
        queued = job_spec(tpb, "swapped", 3)
        queued.dataset.path = "swapped.jsonl"
        queued = train.SubmitJob(tpb.SubmitJobRequest(spec=queued), timeout=30)  # behind long
        channel.close()
    finally:
        started = time.time()
        assert stop_daemon(d) == 0, d.log()
    assert time.time() - started < 60, "the stop waited on the open watch"
    # Other weights in a loaded folder (one weight's last byte changed): not served again as the
    # version they were not.
    weights = tmp_path / "data" / "adapters" / "changed" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    outside = tmp_path / "outside"
    outside.mkdir()
    for link, target in ((datasets / "swapped.jsonl", outside / "swapped.jsonl"),
                         (tmp_path / "data" / "adapters" / "moved", outside / "moved")):
        shutil.move(link, target)
        link.symlink_to(target)

    d = start_daemon(tmp_path)
    try:
        channel = grpc.insecure_channel(d.grpc_address)
        train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
        listed = adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters
        assert sorted((a.name, a.version) for a in listed) == [("by-hand", 1), ("keep", 2)], \
            d.log()
        assert re.search(r"adapter moved version 1 is not served again: .*outside the root",
                         d.log()), d.log()
        assert re.search(r"adapter changed version 1 is not served again: .*holds other files",
                         d.log()), d.log()
        # Four names (two served again, two refused), read on more than one thread.
        assert re.search(r"2 adapter\(s\) served again in [0-9.]+ s \([2-4] thread\(s\)\)",
                         d.log()), d.log()
        # A recorded adapter the restart could not serve again is unloaded from the record (it
        # was NOT_FOUND, and the record stayed: a dead end for deleting its job).
        gone = adapters.UnloadAdapter(apb.UnloadAdapterRequest(name="moved"), timeout=10)
        assert [(a.name, a.version) for a in gone.unloaded] == [("moved", 1)]
        with pytest.raises(grpc.RpcError) as err:
            adapters.UnloadAdapter(apb.UnloadAdapterRequest(name="moved"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
        reloaded = adapters.LoadAdapter(apb.LoadAdapterRequest(name="changed", path="changed"),
                                        timeout=30)
        assert reloaded.version == 2
        train.CancelJob(tpb.CancelJobRequest(job_id=long_job.id), timeout=10)
        failed = wait_for_state(train, tpb, queued.id, tpb.JOB_STATE_FAILED)
        assert "outside the root" in failed.error, failed.error
        job = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "keep", 3)), timeout=30)
        _, states, _ = watch_until_done(train, tpb, job.id)
        assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
        assert train.GetJob(tpb.GetJobRequest(job_id=job.id), timeout=10).summary.adapter_version \
            == 3
        again = adapters.LoadAdapter(apb.LoadAdapterRequest(name="dropped", path="copy"), timeout=30)
        assert again.version == 2, "versions of an unloaded name go on too"
        channel.close()
    finally:
        assert stop_daemon(d) == 0, d.log()
    # A lost job database (deleted, or truncated to nothing) beside job folders is refused, not
    # taken for a new, empty queue that would publish every name from version 1 again.
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / "data" / f"jobs.db{suffix}").unlink(missing_ok=True)
    lost = start_another()
    assert lost.returncode != 0 and "holds no job" in lost.stderr, lost.stderr
    assert "with lorad stopped, restore it from a backup and delete its -wal" in lost.stderr


def test_a_deleted_job_leaves_no_record_or_files_and_its_adapter_must_be_unloaded_first(
        tmp_path, stubs):
    """DeleteJob frees a finished job's disk (checkpoints, adapter) and its history; it refuses
    while the job's adapter is served from the job's folder (a restart serves it from there), and
    a restart after the deletion starts clean, its other jobs and adapters as they were."""
    tpb, apb = stubs.training_pb2, stubs.adapters_pb2
    prepare(tmp_path)
    jobs = tmp_path / "data" / "jobs"
    d = start_daemon(tmp_path)
    try:
        channel = grpc.insecure_channel(d.grpc_address)
        train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
        done = {}
        for name in ("old", "kept"):
            job = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, name, 2, save_every=1)),
                                  timeout=30)
            _, states, _ = watch_until_done(train, tpb, job.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
            done[name] = job.id
        old = jobs / done["old"]
        assert (old / "adapter" / "adapter_model.safetensors").exists()
        assert any(p.name.startswith("checkpoint-") for p in old.iterdir()), list(old.iterdir())

        with pytest.raises(grpc.RpcError) as refused:
            train.DeleteJob(tpb.DeleteJobRequest(job_id=done["old"]), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "adapter 'old' (version 1) is served" in refused.value.details()
        assert "unload the adapter first" in refused.value.details()
        assert (old / "adapter").exists()

        adapters.UnloadAdapter(apb.UnloadAdapterRequest(name="old"), timeout=30)
        train.DeleteJob(tpb.DeleteJobRequest(job_id=done["old"]), timeout=30)
        assert not old.exists()
        assert sorted(p.name for p in jobs.iterdir()) == [done["kept"]]
        with pytest.raises(grpc.RpcError) as gone:
            train.GetJob(tpb.GetJobRequest(job_id=done["old"]), timeout=10)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        channel.close()
    finally:
        assert stop_daemon(d) == 0, d.log()
    d = start_daemon(tmp_path)
    try:
        channel = grpc.insecure_channel(d.grpc_address)
        train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
        listed = train.ListJobs(tpb.ListJobsRequest(), timeout=10).jobs
        assert [(j.id, j.state) for j in listed] == [(done["kept"], tpb.JOB_STATE_SUCCEEDED)]
        served = adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters
        assert [(a.name, a.version) for a in served] == [("kept", 1)], d.log()
        # The name of the deleted job's adapter goes on from its last version.
        job = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "old", 1)), timeout=30)
        _, states, _ = watch_until_done(train, tpb, job.id)
        assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
        assert train.GetJob(tpb.GetJobRequest(job_id=job.id), timeout=10) \
            .summary.adapter_version == 2
        channel.close()
    finally:
        assert stop_daemon(d) == 0, d.log()


def test_a_job_continues_a_served_adapter_from_its_weights_and_settings(tmp_path, stubs):
    """init_adapter, as PEFT's PeftModel.from_pretrained(..., is_trainable=True): the job starts
    from the served adapter's weights (its first loss is the trained adapter's, below a fresh
    adapter's on the same batch), takes its r, alpha and targets when lora is unset, and publishes
    a new version; an adapter not served, or a lora that disagrees, is refused naming the field."""
    tpb = stubs.training_pb2
    prepare(tmp_path)
    d = start_daemon(tmp_path)
    try:
        channel = grpc.insecure_channel(d.grpc_address)
        train = stubs.training_pb2_grpc.TrainingServiceStub(channel)

        def run(spec):
            job = train.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=30)
            _, states, steps = watch_until_done(train, tpb, job.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
            return job, [s.loss for s in steps]

        first, _ = run(job_spec(tpb, "qa", 12))
        _, fresh = run(job_spec(tpb, "fresh", 2))
        again = job_spec(tpb, "qa", 2)
        again.ClearField("lora")
        again.init_adapter = "qa"
        again.init_adapter_path = "/etc"  # the server's to set: replaced
        job, continued = run(again)
        assert (job.spec.lora.r, job.spec.lora.alpha, len(job.spec.lora.target_modules)) == \
            (8, 16, 7)
        assert job.spec.init_adapter_path == str(tmp_path / "data" / "jobs" / first.id / "adapter")
        assert job.spec.init_adapter_version == 1
        assert continued[0] < fresh[0], (continued, fresh)
        done = train.GetJob(tpb.GetJobRequest(job_id=job.id), timeout=10)
        assert (done.summary.adapter_name, done.summary.adapter_version) == ("qa", 2)

        unknown = job_spec(tpb, "x", 2)
        unknown.init_adapter = "nope"
        with pytest.raises(grpc.RpcError) as refused:
            train.SubmitJob(tpb.SubmitJobRequest(spec=unknown), timeout=30)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert "init_adapter: adapter 'nope' is not served" in refused.value.details()
        other_rank = job_spec(tpb, "x", 2)
        other_rank.init_adapter = "qa"
        other_rank.lora.r = 4
        with pytest.raises(grpc.RpcError) as refused:
            train.SubmitJob(tpb.SubmitJobRequest(spec=other_rank), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "lora.r: 4, but init_adapter 'qa' has 8" in refused.value.details()

        # Behind a long job: the folder a waiting job continues is not deleted, and one changed
        # before the job starts fails it, naming the folder.
        adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
        apb = stubs.adapters_pb2
        shutil.copytree(tmp_path / "data" / "jobs" / job.id / "adapter",
                        tmp_path / "data" / "adapters" / "copy")
        adapters.LoadAdapter(apb.LoadAdapterRequest(name="copied", path="copy"), timeout=30)
        long_job = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "long", 100000)),
                                   timeout=30)
        wait_for_state(train, tpb, long_job.id, tpb.JOB_STATE_RUNNING)
        waiting = []
        for source in ("qa", "copied"):
            spec = job_spec(tpb, "later", 2)
            spec.init_adapter = source
            waiting.append(train.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=30))
        adapters.UnloadAdapter(apb.UnloadAdapterRequest(name="qa"), timeout=30)
        with pytest.raises(grpc.RpcError) as kept:
            train.DeleteJob(tpb.DeleteJobRequest(job_id=job.id), timeout=30)
        assert kept.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"job '{waiting[0].id}' (queued) continues adapter 'qa'" in kept.value.details()
        weights = tmp_path / "data" / "adapters" / "copy" / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
        changed = job_spec(tpb, "later", 2)
        changed.init_adapter = "copied"
        with pytest.raises(grpc.RpcError) as refused:
            train.SubmitJob(tpb.SubmitJobRequest(spec=changed), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "holds other files than when it was loaded" in refused.value.details()
        train.CancelJob(tpb.CancelJobRequest(job_id=long_job.id), timeout=10)
        wait_for_state(train, tpb, waiting[0].id, tpb.JOB_STATE_SUCCEEDED)
        failed = wait_for_state(train, tpb, waiting[1].id, tpb.JOB_STATE_FAILED)
        assert "init_adapter: its folder " + str(tmp_path / "data" / "adapters" / "copy") \
            + " holds other files than when the job was submitted" in failed.error, failed.error
        # Retried, it would fail at its start again (it has no checkpoint): refused up front.
        with pytest.raises(grpc.RpcError) as refused:
            train.RetryJob(tpb.RetryJobRequest(job_id=waiting[1].id), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "holds other files than when the job was submitted" in refused.value.details()
        train.DeleteJob(tpb.DeleteJobRequest(job_id=job.id), timeout=30)  # nothing waits on it now
        channel.close()
    finally:
        assert stop_daemon(d) == 0, d.log()


def test_a_submission_whose_adapter_folder_is_deleted_meanwhile_is_refused(tmp_path, stubs):
    """A job continuing adapter 'qa' is submitted on a large dataset (its check takes seconds);
    meanwhile 'qa' is unloaded and the job that trained it deleted, folder and all. The
    submission was queued anyway (and failed at its start): it is refused, naming the folder."""
    tpb, apb = stubs.training_pb2, stubs.adapters_pb2
    prepare(tmp_path)
    lines = QA.read_text()
    (tmp_path / "data" / "datasets" / "big.jsonl").write_text(
        lines * (64 * 1024 * 1024 // len(lines)))  # ~2 s a check
    d = start_daemon(tmp_path)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
            first = train.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "qa", 2)), timeout=30)
            _, states, _ = watch_until_done(train, tpb, first.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
            spec = job_spec(tpb, "later", 2)
            spec.ClearField("lora")
            spec.init_adapter = "qa"
            spec.dataset.path = "big.jsonl"
            outcome = {}

            def submit():
                try:
                    outcome["job"] = train.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=300)
                except grpc.RpcError as e:
                    outcome["error"] = e

            submitting = threading.Thread(target=submit)
            submitting.start()
            time.sleep(0.5)  # its check of the dataset has begun
            adapters.UnloadAdapter(apb.UnloadAdapterRequest(name="qa"), timeout=30)
            train.DeleteJob(tpb.DeleteJobRequest(job_id=first.id), timeout=30)
            submitting.join()
        assert "error" in outcome, f"queued: {outcome.get('job')}"
        assert outcome["error"].code() == grpc.StatusCode.FAILED_PRECONDITION, outcome["error"]
        folder = str(tmp_path / "data" / "jobs" / first.id / "adapter")
        assert f"its folder {folder} cannot be read" in outcome["error"].details()
    finally:
        assert stop_daemon(d) == 0, d.log()


def test_pretty_printed_inline_examples_train_with_the_raw_template(tmp_path, stubs):
    """Inline examples laid out over several lines (as YAML block scalars or json.dumps(indent=2)
    give them) train like one-line ones, here with template 'raw' (TRL's prompt + completion).
    The summary counts the example whose prompt alone passes max_seq_length (128) as dropped and
    the one whose answer does as truncated; with skip_bad_lines, the record without its answer
    is counted as skipped and named, with why and its keys, as the first skipped."""
    import json

    pb = stubs.training_pb2
    records = [json.loads(line) for line in QA.read_text().splitlines()[:4]]
    long_text = " ".join(["words"] * 400)
    records += [{"question": long_text, "answer": "short"},
                {"question": "Say many words.", "answer": long_text}, {"question": "Lost?"}]
    spec = job_spec(pb, "inline-raw", steps=2)
    spec.dataset.path = ""
    spec.dataset.skip_bad_lines = True
    spec.dataset.template = "raw"
    for record in records:
        spec.dataset.inline_examples.add(json=json.dumps(record, indent=2))
    d = start_daemon(tmp_path)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            job = stub.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=30)
            _, states, steps = watch_until_done(stub, pb, job.id)
            done = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10)
            assert states[-1] == pb.JOB_STATE_SUCCEEDED, done.error
            assert [s.step for s in steps] == [1, 2]
            assert (done.summary.dropped_examples, done.summary.truncated_examples) == (1, 1)
            assert done.summary.skipped_lines == 1, done.summary
            first = done.summary.first_skipped
            assert first.startswith("dataset.inline_examples[6]: record matches no known format")\
                and first.endswith("(its keys: question)"), done.summary
            # A replay from past the last step still ends with the summary.
            late = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.id, from_step=1000),
                                      timeout=30))
            kinds = [e.WhichOneof("event") for e in late]
            assert "step" not in kinds and kinds[-2:] == ["finished", "state"], kinds
    finally:
        stop_daemon(d)

