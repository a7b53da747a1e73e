"""Restarts of the daemon on folders that moved or changed since the last start: the data folder
moved or copied (its jobs and adapters follow), a dataset root pointed elsewhere (recorded paths
stay), the model folder's files changed (the adapters made for the old base are named), a job
database older than its job folders (they are named), adapter names an older lorad recorded."""
import json
import os
import re
import shutil
import subprocess
import time

import grpc
import pytest

from conftest import start_daemon, stop_daemon, tiny_model_path
from test_training_end_to_end import QA, job_spec, prepare, wait_for_state, watch_until_done


def train_then_stop(folder, stubs, name, **start):
    """Trains a 2-step job named `name` to its end on a daemon over `folder`, then stops the
    daemon; returns the job's id."""
    tpb = stubs.training_pb2
    d = start_daemon(folder, **start)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            done = stub.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, name, 2)), timeout=30)
            _, states, _ = watch_until_done(stub, tpb, done.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
    finally:
        assert stop_daemon(d) == 0, d.log()
    return done.id


HELD = ("--set", "training.max_running_jobs=0")  # jobs stay queued


def queue_held_job(folder, stubs, *args):
    """Queues a 2-step job on dataset qa.jsonl on a daemon over `folder` (jobs held, `args` added),
    then stops it; returns SubmitJob's reply."""
    tpb = stubs.training_pb2
    d = start_daemon(folder, *args, *HELD)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            return stub.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "rooted", 2)),
                                  timeout=30)
    finally:
        assert stop_daemon(d) == 0, d.log()


def recorded_dataset_path(folder, stubs, job_id, *args):
    """The dataset path a restart (jobs held, `args` added) gives the job; and its log."""
    tpb = stubs.training_pb2
    d = start_daemon(folder, *args, *HELD)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            return stub.GetJob(tpb.GetJobRequest(job_id=job_id), timeout=10).spec.dataset.path, \
                d.log()
    finally:
        stop_daemon(d)


def test_a_restart_on_another_base_model_says_which_adapters_were_made_for_the_other(
        tmp_path, stubs):
    """A restart on a model folder whose files differ from the base an adapter was made on (here
    its config's rms_norm_eps, as another revision of the same shapes): the recorded adapters
    serve again, as PEFT would load them, and the log names them as made for the other base, at
    every start on it; back on the original folder, nothing is said (each adapter's own base is
    compared, not the last start's: that named the adapters made on the original folder, and
    nothing at a second start on the other)."""
    apb = stubs.adapters_pb2
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path(), model)
    prepare(tmp_path)
    train_then_stop(tmp_path, stubs, "made-here", model=model)
    d = start_daemon(tmp_path, model=model)  # the same files: nothing to say
    assert stop_daemon(d) == 0, d.log()
    assert "adapter(s) served again were trained" not in d.log(), d.log()
    # As an older lorad left the record (no base), or one that published a newer version: the
    # base is not known, and the last start's is taken for it, once.
    import sqlite3

    with sqlite3.connect(tmp_path / "data" / "jobs.db") as db:
        db.execute("UPDATE adapters SET base_fingerprint = '0:another version''s'")
    db.close()

    original = (model / "config.json").read_text()
    config = json.loads(original)
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    (model / "config.json").write_text(json.dumps(config))
    for _ in range(2):  # every start on the other base says so
        d = start_daemon(tmp_path, model=model)
        try:
            assert re.search(r"the base model in .* is not the one 1 adapter\(s\) served again "
                             r"were trained or loaded on .*: made-here v1", d.log()), d.log()
            with grpc.insecure_channel(d.grpc_address) as channel:
                adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
                listed = adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters
                assert [(a.name, a.version, a.other_base) for a in listed] == \
                    [("made-here", 1, True)]
            # Clients are told too, not only the log.
            from conftest import BUILD

            ls = subprocess.run([str(BUILD / "clients" / "loradctl"), "--address",
                                 d.grpc_address, "adapters", "ls"], capture_output=True,
                                text=True, timeout=60)
            assert ls.returncode == 0 and "serving (other base)" in ls.stdout, ls
        finally:
            stop_daemon(d)
    (model / "config.json").write_text(original)
    d = start_daemon(tmp_path, model=model)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
            listed = adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters
            assert [(a.name, a.other_base) for a in listed] == [("made-here", False)]
    finally:
        assert stop_daemon(d) == 0, d.log()
    assert "adapter(s) served again were trained" not in d.log(), d.log()


def test_a_jobs_adapter_whose_files_changed_is_not_served_again_and_requests_say_why(
        tmp_path, stubs):
    """A job's adapter is recorded with what its files held, as one loaded by hand: weights
    changed in its job folder while lorad was stopped are not served as the version they were
    not, and a request naming it says why, not only that it is not loaded."""
    ipb = stubs.inference_pb2
    prepare(tmp_path)
    job_id = train_then_stop(tmp_path, stubs, "tampered")
    weights = tmp_path / "data" / "jobs" / job_id / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    d = start_daemon(tmp_path)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
            listed = adapters.ListAdapters(stubs.adapters_pb2.ListAdaptersRequest(), timeout=10)
            assert [a.name for a in listed.adapters] == [], d.log()
            inference = stubs.inference_pb2_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                list(inference.Generate(ipb.GenerateRequest(
                    prompt="hi", adapter="tampered",
                    sampling=ipb.SamplingParams(max_new_tokens=2)), timeout=30))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            details = err.value.details()
            assert details.startswith("adapter 'tampered' is not loaded: version 1 was not served "
                                      "again at start-up: "), details
            assert "holds other files than when version 1 was published by its job" in details, \
                details
            # Unloaded (its record cleared), it is plainly not loaded.
            adapters.UnloadAdapter(stubs.adapters_pb2.UnloadAdapterRequest(name="tampered"),
                                   timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                list(inference.Generate(ipb.GenerateRequest(
                    prompt="hi", adapter="tampered",
                    sampling=ipb.SamplingParams(max_new_tokens=2)), timeout=30))
            assert err.value.details() == "adapter 'tampered' is not loaded", err.value.details()
    finally:
        assert stop_daemon(d) == 0, d.log()


def test_another_chat_template_than_at_the_last_start_names_the_adapters_jobs_trained(
        tmp_path, stubs):
    """A job on the model's own template trains on the one model.chat_template renders; started
    with another, Chat prompts its adapter in a form it did not learn: the start says so, naming
    the adapters (a running job would refuse to resume for the same change)."""
    tpb = stubs.training_pb2
    prepare(tmp_path)
    train_then_stop(tmp_path, stubs, "templated")
    d = start_daemon(tmp_path)  # one naming its own template: not changed by the operator's
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            spec = job_spec(tpb, "own-template", 2)
            spec.dataset.template = "alpaca"
            done = stub.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=30)
            _, states, _ = watch_until_done(stub, tpb, done.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
    finally:
        assert stop_daemon(d) == 0, d.log()
    d = start_daemon(tmp_path, "--set", "model.chat_template=llama2")
    try:
        assert re.search(r"model.chat_template is 'llama2' now but was \"\" \(the model folder's "
                         r"own\) at the last start: .*: templated \(set it back", d.log()), d.log()
    finally:
        assert stop_daemon(d) == 0, d.log()
    d = start_daemon(tmp_path, "--set", "model.chat_template=llama2")  # the same again: quiet
    try:
        assert "model.chat_template is" not in d.log(), d.log()
    finally:
        assert stop_daemon(d) == 0, d.log()


def test_a_moved_data_folder_keeps_its_jobs_and_adapters(tmp_path, stubs):
    """The data folder moved (or mounted elsewhere, as into a container) between two starts:
    the adapters are served again, an interrupted job resumes, and a queued job that continues
    an adapter reads it, from the new place."""
    tpb, apb = stubs.training_pb2, stubs.adapters_pb2
    first = tmp_path / "first"
    prepare(first)
    d = start_daemon(first)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            done = stub.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "moved", 3)), timeout=30)
            _, states, _ = watch_until_done(stub, tpb, done.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED
            long_job = stub.SubmitJob(
                tpb.SubmitJobRequest(spec=job_spec(tpb, "long", 100000, save_every=2)), timeout=30)
            for event in stub.WatchJob(tpb.WatchJobRequest(job_id=long_job.id), timeout=120):
                if event.WhichOneof("event") == "checkpoint":
                    break
            # Queued behind the long one (one job at a time): its init_adapter_path names the
            # first job's adapter folder, inside the data folder.
            spec = job_spec(tpb, "continued", 2)
            spec.init_adapter = "moved"
            continued = stub.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=30)
            assert continued.spec.init_adapter_path.startswith(str(first)), continued.spec
    finally:
        assert stop_daemon(d) == 0, d.log()
    # Moved, and reached through a symlink (a mount point, say): paths follow to the place itself.
    second = tmp_path / "second"
    shutil.move(first, second)
    link = tmp_path / "link"
    link.symlink_to(second)
    d = start_daemon(link)
    try:
        assert "moved since the last start" in d.log(), d.log()
        with grpc.insecure_channel(d.grpc_address) as channel:
            adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
            listed = adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters
            assert [(a.name, a.version) for a in listed] == [("moved", 1)], d.log()
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            summary = stub.GetJob(tpb.GetJobRequest(job_id=done.id), timeout=10).summary
            assert summary.adapter_path.startswith(str(second)), summary.adapter_path
            job = wait_for_state(stub, tpb, long_job.id, tpb.JOB_STATE_RUNNING)
            assert job.spec.dataset.path.startswith(str(second)), job.spec.dataset.path
            deadline = time.time() + 60
            while "resuming from" not in d.log() and time.time() < deadline:
                time.sleep(0.1)
            assert f"resuming from {link}" in d.log(), d.log()  # the job folder as configured
            stub.CancelJob(tpb.CancelJobRequest(job_id=long_job.id), timeout=10)
            _, states, _ = watch_until_done(stub, tpb, continued.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
            job = stub.GetJob(tpb.GetJobRequest(job_id=continued.id), timeout=10)
            assert job.spec.init_adapter_path.startswith(str(second)), job.spec.init_adapter_path
    finally:
        stop_daemon(d)


def test_another_dataset_root_leaves_queued_jobs_on_their_files(tmp_path, stubs):
    """storage.dataset_root pointed at another folder between two starts, the old one still
    there: a queued job's dataset still names the file it was submitted with (it was rewritten
    into the new root as if the folder had moved, and the job trained on another file of the same
    name there)."""
    tpb = stubs.training_pb2
    old_root, new_root = tmp_path / "datasets-a", tmp_path / "datasets-b"
    for root in (old_root, new_root):
        root.mkdir()
        shutil.copy(QA, root / "qa.jsonl")
    job = queue_held_job(tmp_path, stubs, "--set", f"storage.dataset_root={old_root}")
    submitted = job.spec.dataset.path
    assert submitted == os.path.realpath(old_root / "qa.jsonl"), submitted
    path, log = recorded_dataset_path(tmp_path, stubs, job.id,
                                      "--set", f"storage.dataset_root={new_root}")
    assert "moved since the last start" not in log, log
    assert "the paths recorded under the old place stay as they are" in log, log
    assert path == submitted, path
    # Let run under the new root, the job is refused saying why, not trained on the other file.
    d = start_daemon(tmp_path, "--set", f"storage.dataset_root={new_root}")
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            _, states, _ = watch_until_done(stub, tpb, job.id)
            assert states[-1] == tpb.JOB_STATE_FAILED, d.log()
            error = stub.GetJob(tpb.GetJobRequest(job_id=job.id), timeout=10).error
            assert "storage.dataset_root changed since the job was submitted" in error, error
    finally:
        stop_daemon(d)


def test_job_folders_the_database_does_not_know_are_named_at_start(tmp_path, stubs):
    """A job database older than the job folders beside it (a restored backup): the start says
    which folders it does not know (nothing lists or deletes them, and their adapters' versions
    may be published again)."""
    tpb = stubs.training_pb2
    prepare(tmp_path)
    held = ("--set", "training.max_running_jobs=0")
    d = start_daemon(tmp_path, *held)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            stub.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "known", 2)), timeout=30)
    finally:
        assert stop_daemon(d) == 0, d.log()
    (tmp_path / "data" / "jobs" / "job-made-after-the-backup").mkdir(parents=True)
    d = start_daemon(tmp_path, *held)
    try:
        assert re.search(r"holds 1 job folder\(s\) the job database .* does not know "
                         r"\(job-made-after-the-backup\)", d.log()), d.log()
    finally:
        stop_daemon(d)


def test_a_copied_data_folder_serves_its_adapters_from_the_copy(tmp_path, stubs):
    """The data folder copied (the original left in place) and the daemon started on the copy:
    the job database in it is the copy's, so its paths follow to the copy (kept at the original,
    they led outside the copy's adapter root and nothing was served)."""
    tpb, apb = stubs.training_pb2, stubs.adapters_pb2
    first = tmp_path / "first"
    prepare(first)
    done_id = train_then_stop(first, stubs, "copied")
    second = tmp_path / "second"
    shutil.copytree(first, second, symlinks=True)
    d = start_daemon(second)
    try:
        assert "moved since the last start" in d.log(), d.log()
        with grpc.insecure_channel(d.grpc_address) as channel:
            adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
            listed = adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters
            assert [(a.name, a.version) for a in listed] == [("copied", 1)], d.log()
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            job = stub.GetJob(tpb.GetJobRequest(job_id=done_id), timeout=10)
            assert job.summary.adapter_path.startswith(str(second)), job.summary.adapter_path
    finally:
        stop_daemon(d)


def test_an_adapter_name_an_older_lorad_took_can_still_be_unloaded(tmp_path, stubs):
    """An adapter recorded under a name an older lorad accepted (a leading '.', '..' inside, over
    64 characters) is served again at every start: unloading it must work, or it never goes."""
    import sqlite3

    apb = stubs.adapters_pb2
    prepare(tmp_path)
    train_then_stop(tmp_path, stubs, "today")
    legacy = [".hidden", "a..b", "x" * 70]
    db = sqlite3.connect(tmp_path / "data" / "jobs.db")
    row = db.execute("SELECT version, path, source, served, fingerprint FROM adapters").fetchone()
    for name in legacy:  # as the older lorad recorded them
        db.execute("INSERT INTO adapters (name, version, path, source, served, fingerprint) "
                   "VALUES (?, ?, ?, ?, ?, ?)", (name, *row))
    # One whose folder changed since: not served again, its record left to unload.
    db.execute("INSERT INTO adapters (name, version, path, source, served, fingerprint) "
               "VALUES (?, ?, ?, ?, ?, ?)", ("..unserved", *row[:4], "changed"))
    db.commit()
    db.close()
    d = start_daemon(tmp_path)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
            listed = {a.name for a in adapters.ListAdapters(apb.ListAdaptersRequest(),
                                                           timeout=10).adapters}
            assert set(legacy) <= listed, d.log()
            assert "..unserved" not in listed, d.log()
            for name in [*legacy, "..unserved"]:
                adapters.UnloadAdapter(apb.UnloadAdapterRequest(name=name), timeout=30)
            listed = {a.name for a in adapters.ListAdapters(apb.ListAdaptersRequest(),
                                                           timeout=10).adapters}
            assert listed == {"today"}, listed
            # A name no older lorad could have served is still refused by today's rule.
            with pytest.raises(grpc.RpcError) as refused:
                adapters.UnloadAdapter(apb.UnloadAdapterRequest(name=".other"), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stop_daemon(d)


def test_the_default_dataset_root_pointed_elsewhere_leaves_queued_jobs_on_their_files(
        tmp_path, stubs):
    """The default dataset root (inside the data folder) pointed at another folder, the data
    folder where it was: not a move (the data folder's roots follow it only where it moved)."""
    prepare(tmp_path)  # data/datasets/qa.jsonl, the default root
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(QA, other / "qa.jsonl")
    job = queue_held_job(tmp_path, stubs)
    path, log = recorded_dataset_path(tmp_path, stubs, job.id,
                                      "--set", f"storage.dataset_root={other}")
    assert "moved since the last start" not in log, log
    assert path == job.spec.dataset.path, path

def test_a_moved_data_folder_beside_a_new_dataset_root_keeps_its_jobs_files(tmp_path, stubs):
    """The data folder moved and storage.dataset_root pointed elsewhere at the same restart: the
    default root's files moved with the data folder, so a queued job follows them there, not into
    the new root (where it trained on another file of the same name)."""
    first = tmp_path / "first"
    prepare(first)  # first/data/datasets/qa.jsonl, the default root
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(QA, other / "qa.jsonl")
    job = queue_held_job(first, stubs)
    second = tmp_path / "second"
    shutil.move(first, second)
    path, _ = recorded_dataset_path(second, stubs, job.id, "--set", f"storage.dataset_root={other}")
    assert path == os.path.realpath(second / "data" / "datasets" / "qa.jsonl"), path

def test_a_moved_dataset_root_is_followed_after_a_start_on_the_old_config(tmp_path, stubs):
    """A dataset root moved and lorad started once on the old config (it creates the root it does
    not find: an empty folder at the old place) before the config names the new place: the
    empty old folder counts as gone, and the queued job follows its file."""
    old_root, new_root = tmp_path / "datasets-a", tmp_path / "datasets-b"
    old_root.mkdir()
    shutil.copy(QA, old_root / "qa.jsonl")
    job = queue_held_job(tmp_path, stubs, "--set", f"storage.dataset_root={old_root}")
    shutil.move(old_root, new_root)
    recorded_dataset_path(tmp_path, stubs, job.id, "--set", f"storage.dataset_root={old_root}")
    assert old_root.is_dir() and not any(old_root.iterdir())  # created again, empty
    path, _ = recorded_dataset_path(tmp_path, stubs, job.id,
                                    "--set", f"storage.dataset_root={new_root}")
    assert path == os.path.realpath(new_root / "qa.jsonl"), path
