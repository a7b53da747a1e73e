"""A restart of the daemon on a model folder whose files changed since the last start."""
import json
import re
import shutil

import grpc

from conftest import start_daemon, stop_daemon, tiny_model_path
from test_training_end_to_end import job_spec, prepare, watch_until_done


def test_a_restart_on_another_base_model_says_which_adapters_were_made_for_the_other(
        tmp_path, stubs):
    """A restart on a model folder whose files differ from the last start's (here its config's
    rms_norm_eps, as another revision of the same shapes): the recorded adapters serve again, as
    PEFT would load them, and the log names them as made for the other base."""
    tpb, apb = stubs.training_pb2, stubs.adapters_pb2
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path(), model)
    prepare(tmp_path)
    d = start_daemon(tmp_path, model=model)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            done = stub.SubmitJob(tpb.SubmitJobRequest(spec=job_spec(tpb, "made-here", 2)),
                                  timeout=30)
            _, states, _ = watch_until_done(stub, tpb, done.id)
            assert states[-1] == tpb.JOB_STATE_SUCCEEDED, d.log()
    finally:
        assert stop_daemon(d) == 0, d.log()
    d = start_daemon(tmp_path, model=model)  # the same files: nothing to say
    assert stop_daemon(d) == 0, d.log()
    assert "is not the one of the last start" not in d.log(), d.log()

    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    (model / "config.json").write_text(json.dumps(config))
    d = start_daemon(tmp_path, model=model)
    try:
        assert re.search(r"the base model in .* is not the one of the last start .* 1 adapter\(s\) "
                         r"served again .*: made-here v1", d.log()), d.log()
        with grpc.insecure_channel(d.grpc_address) as channel:
            adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
            listed = adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters
            assert [(a.name, a.version) for a in listed] == [("made-here", 1)]
    finally:
        stop_daemon(d)
