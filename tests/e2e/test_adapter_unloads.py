"""UnloadAdapter against the real daemon over real gRPC, where it meets other calls' lives: a
shutdown while it waits for the requests running on the adapter."""
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from conftest import long_context_model, start_daemon, stop_daemon
from test_inference_service import peft_adapter_dir, reference  # noqa: F401 (fixtures)


def test_an_unload_waiting_on_running_requests_answers_ok_when_lorad_stops(
        tmp_path, stubs, peft_adapter_dir):
    """The unload took effect before the wait (a restart does not serve the adapter again), so
    a stop during the wait answers it OK, listing what still drains: cut by the grace period it
    read as failed (UNAVAILABLE), and a client that retried got NOT_FOUND."""
    apb, ipb = stubs.adapters_pb2, stubs.inference_pb2
    src, _ = peft_adapter_dir
    d = start_daemon(tmp_path, "--set", "server.shutdown_grace_seconds=2",
                     "--set", "limits.max_new_tokens=100000",
                     model=long_context_model(tmp_path / "long-model"))
    shutil.copytree(src, tmp_path / "data" / "adapters" / "a")
    try:
        with grpc.insecure_channel(d.grpc_address) as channel, ThreadPoolExecutor(2) as pool:
            adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
            adapters.LoadAdapter(apb.LoadAdapterRequest(name="pulled", path="a"), timeout=30)
            stream = stubs.inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                ipb.GenerateRequest(prompt="Once upon a time", adapter="pulled",
                                    sampling=ipb.SamplingParams(max_new_tokens=100000,
                                                                ignore_eos=True)), timeout=300)
            next(stream)  # running on it
            unload = pool.submit(adapters.UnloadAdapter,
                                 apb.UnloadAdapterRequest(name="pulled"), timeout=300)
            deadline = time.time() + 30
            while any(a.current for a in adapters.ListAdapters(apb.ListAdaptersRequest(),
                                                               timeout=10).adapters):
                assert time.time() < deadline and not unload.done(), d.log()
                time.sleep(0.05)
            time.sleep(0.5)  # waiting on the stream
            assert not unload.done()
            assert stop_daemon(d) == 0, d.log()
            reply = unload.result(timeout=60)
            assert [a.name for a in reply.unloaded] == ["pulled"], reply
    finally:
        stop_daemon(d)
    d = start_daemon(tmp_path)
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
            assert list(adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=10).adapters) \
                == []
    finally:
        assert stop_daemon(d) == 0, d.log()
