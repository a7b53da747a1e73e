"""Limits a careless or stalled client meets on the serving side, against the real daemon (tiny
fixture model): streams whose client stopped reading count against limits.max_queued_requests
until written and end at limits.max_unread_stream_bytes; adapter names are bounded by
limits.max_loaded_adapters; one client's streams by limits.max_streams_per_client."""
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from conftest import long_context_model, start_daemon, stop_daemon
from test_inference_service import collect, peft_adapter_dir, reference  # noqa: F401 (fixtures)


def slow_reader(d):
    """A channel whose receive window stays small: the server cannot write far ahead of it."""
    return grpc.insecure_channel(d.grpc_address, options=[
        ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)])


def unread_stream(stubs, channel, max_new_tokens):
    """A greedy stream of `max_new_tokens` with 20 log-probabilities a token, not read yet."""
    pb = stubs.inference_pb2
    return stubs.inference_pb2_grpc.InferenceServiceStub(channel).Generate(
        pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(
            max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, logprobs=20)),
        timeout=120)


def wait_for_metric(d, text):
    deadline = time.time() + 60
    while time.time() < deadline and text not in d.http_get("/metrics")[1]:
        time.sleep(0.2)
    return text in d.http_get("/metrics")[1]


def test_streams_a_client_stopped_reading_count_until_written(tmp_path, stubs):
    """A stream whose client stopped reading holds its output after the engine is done with it:
    it counts against limits.max_queued_requests until its last chunk is written, so such
    streams cannot pile up without bound."""
    pb = stubs.inference_pb2
    d = start_daemon(tmp_path, "--set", "limits.max_queued_requests=1")
    slow = slow_reader(d)
    other = grpc.insecure_channel(d.grpc_address)
    try:
        unread = unread_stream(stubs, slow, 600)
        assert wait_for_metric(d, "finished_reason=\"length\""), "the engine finished it"
        stub = stubs.inference_pb2_grpc.InferenceServiceStub(other)
        req = pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(max_new_tokens=2))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(req, timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # What holds the place, as it is: not a request decoding or waiting.
        assert err.value.details() == (
            "1 generation streams are open (limits.max_queued_requests): 0 decoding, 0 waiting, "
            "1 finished but not yet read by their clients; retry later"), err.value.details()
        chunks = list(unread)  # read at last: the whole output, then the stream closes
        assert sum(len(c.tokens) for c in chunks) == 600
        deadline = time.time() + 10
        while True:  # its slot is given back once the call is done on the server too
            try:
                assert len(list(stub.Generate(req, timeout=30))[-1].text) >= 0
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.time() < deadline
                time.sleep(0.1)
    finally:
        slow.close()
        other.close()
        stop_daemon(d)


def test_a_stream_whose_client_stops_reading_ends_at_its_unread_limit(tmp_path, stubs):
    """A Generate stream whose client stopped reading held all its output in memory (about 3 KB a
    token with 20 log-probabilities: 1,024 such streams of 4,096 tokens were 14 GB). Past
    limits.max_unread_stream_bytes of unread output the stream ends RESOURCE_EXHAUSTED and the
    request is cancelled, and the daemon serves the others."""
    pb = stubs.inference_pb2
    d = start_daemon(tmp_path, "--set", "limits.max_unread_stream_bytes=65536")
    slow = slow_reader(d)
    try:
        unread = unread_stream(stubs, slow, 900)
        assert wait_for_metric(d, "finished_reason=\"cancelled\""), d.log()
        with pytest.raises(grpc.RpcError) as err:
            for _ in unread:
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limits.max_unread_stream_bytes" in err.value.details()
        with grpc.insecure_channel(d.grpc_address) as other:
            _, ids = collect(stubs.inference_pb2_grpc.InferenceServiceStub(other).Generate(
                pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(max_new_tokens=3)),
                timeout=30))
            assert len(ids) == 3
    finally:
        slow.close()
        stop_daemon(d)


def test_a_slow_clients_stream_comes_in_messages_it_can_receive(tmp_path, stubs):
    """What a client has not read yet is sent in messages of about 1 MiB at most: sent as one, the
    output of a client that read slower than the model wrote grew past the 4 MiB a gRPC client
    receives by default, and its stream failed on the client (RESOURCE_EXHAUSTED, "received
    message larger than max") well short of limits.max_unread_stream_bytes."""
    d = start_daemon(tmp_path, "--set", "limits.max_unread_stream_bytes=33554432",
                     "--set", "limits.max_new_tokens=100000",
                     model=long_context_model(tmp_path / "long-model"))
    slow = slow_reader(d)  # with the default 4 MiB receive limit
    try:
        # About 460 bytes a token here (the fixture's short tokens): 4,000 tokens wait as about
        # 1.8 MB, in two messages or more.
        unread = unread_stream(stubs, slow, 4000)
        assert wait_for_metric(d, "finished_reason=\"length\""), d.log()
        chunks = list(unread)
        assert sum(len(c.tokens) for c in chunks) == 4000
        sizes = [c.ByteSize() for c in chunks]
        assert sum(sizes) > 1.5 * 2**20, "not enough output waited to test the limit"
        assert max(sizes) < 1.25 * 2**20, sizes
    finally:
        slow.close()
        stop_daemon(d)


def test_loaded_adapter_names_are_bounded_by_their_limit(tmp_path, stubs, peft_adapter_dir):
    """LoadAdapter took any number of names, each with its own host copy of the weights (200
    loads of a 19 MB adapter: +4 GB, and a restart reloading them all before serving): a new name
    past limits.max_loaded_adapters is RESOURCE_EXHAUSTED naming the limit; a new version of a
    loaded name is not, and an unload makes room."""
    apb = stubs.adapters_pb2
    d = start_daemon(tmp_path, "--set", "limits.max_loaded_adapters=2",
                     "--set", "limits.max_new_tokens=100000",
                     model=long_context_model(tmp_path / "long-model"))
    src, _ = peft_adapter_dir
    shutil.copytree(src, tmp_path / "data" / "adapters" / "a")
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            astub = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
            load = lambda name: astub.LoadAdapter(apb.LoadAdapterRequest(name=name, path="a"),
                                                  timeout=30)
            load("one")
            load("two")
            with pytest.raises(grpc.RpcError) as err:
                load("three")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limits.max_loaded_adapters" in err.value.details()
            assert load("two").version == 2  # a new version of a loaded name
            astub.UnloadAdapter(apb.UnloadAdapterRequest(name="one"), timeout=60)
            assert load("three").version == 1
            # Loads of new names at once: each counted from its start (two running together
            # both passed the check, and three names were loaded 4 times in 5).
            for name in ("two", "three"):
                astub.UnloadAdapter(apb.UnloadAdapterRequest(name=name), timeout=60)
            barrier = threading.Barrier(8)

            def load_at_once(i):
                barrier.wait()
                try:
                    return load(f"new-{i}").version
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                    return None

            with ThreadPoolExecutor(8) as pool:
                loaded = [v for v in pool.map(load_at_once, range(8)) if v is not None]
            listed = {a.name for a in astub.ListAdapters(apb.ListAdaptersRequest(),
                                                         timeout=30).adapters}
            assert len(loaded) == 2 and len(listed) == 2, listed
            # A name unloaded while a request runs on it still holds its weights, and counts:
            # the refusal says so, or "unload one first" reads as an unload that did nothing.
            held = sorted(listed)[0]
            ipb = stubs.inference_pb2
            stream = stubs.inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                ipb.GenerateRequest(prompt="Once upon a time", adapter=held,
                                    sampling=ipb.SamplingParams(max_new_tokens=100000,
                                                                ignore_eos=True)), timeout=300)
            next(stream)  # running
            astub.UnloadAdapter(apb.UnloadAdapterRequest(name=held), timeout=2)
            with pytest.raises(grpc.RpcError) as err:
                load("another")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.details().endswith(
                f"unload one first, or raise the limit; unloaded but still held by running "
                f"requests, until they end: '{held}'"), err.value.details()
            stream.cancel()
    finally:
        stop_daemon(d)


def test_one_clients_burst_does_not_hold_back_another_clients_request(tmp_path, stubs):
    """Waiting requests are admitted by their client's share of the batch, not in arrival order
    alone: with two places, a client running two and waiting with four more does not keep a
    second client's request (another connection) waiting behind all six."""
    pb = stubs.inference_pb2
    d = start_daemon(tmp_path, "--set", "model.base_weights=none",
                     "--set", "engine.max_running_requests=2")

    def channel():  # a connection of its own: without tokens, a client is its connection
        return grpc.insecure_channel(d.grpc_address, options=[("grpc.use_local_subchannel_pool", 1)])

    def request(tokens):
        return pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(
            max_new_tokens=tokens, temperature=0.0, ignore_eos=True))

    first_token = {}

    def stream(stub, name, tokens):
        for chunk in stub.Generate(request(tokens), timeout=300):
            if chunk.tokens and name not in first_token:
                first_token[name] = time.monotonic()

    try:
        with channel() as busy, channel() as other, ThreadPoolExecutor(8) as pool:
            busy_stub = stubs.inference_pb2_grpc.InferenceServiceStub(busy)
            # The first ends well before the second: its place is the first to come free.
            lengths = [500, 1500, 1500, 1500, 1500, 1500]
            burst = []
            for i, tokens in enumerate(lengths):
                burst.append(pool.submit(stream, busy_stub, f"busy{i}", tokens))
                while f"busy{min(i, 1)}" not in first_token:  # in this order
                    assert all(not f.done() or f.exception() is None for f in burst)
                    time.sleep(0.005)
            deadline = time.time() + 60
            while "lorad_num_requests_waiting 4" not in d.http_get("/metrics")[1]:
                assert time.time() < deadline, d.http_get("/metrics")[1]
                time.sleep(0.01)
            waiting = [f"busy{i}" for i in range(6) if f"busy{i}" not in first_token]
            assert len(waiting) >= 3, first_token  # the shortest may have ended meanwhile
            other_stub = stubs.inference_pb2_grpc.InferenceServiceStub(other)
            pool.submit(stream, other_stub, "other", 4).result()
            for f in burst:
                f.result()
        assert first_token["other"] < min(first_token[name] for name in waiting), \
            (first_token, d.log())
    finally:
        assert stop_daemon(d) == 0, d.log()


def test_a_refusal_for_open_streams_blames_unread_ones_only_when_there_are_some(tmp_path, stubs):
    """limits.max_queued_requests refused a burst saying its places were held by streams
    "finished but not yet read by their clients", counted as the limit less the engine's running
    and waiting counts, which lag requests just submitted: every client was reading."""
    pb = stubs.inference_pb2
    d = start_daemon(tmp_path, "--set", "limits.max_queued_requests=2",
                     "--set", "limits.max_new_tokens=100000",
                     model=long_context_model(tmp_path / "long-model"))
    # Far longer than the 2 s each is held open: none finishes unread.
    request = pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(
        max_new_tokens=100000, ignore_eos=True))
    refusals, streams = [], []

    def one(_):
        with grpc.insecure_channel(d.grpc_address) as channel:
            call = stubs.inference_pb2_grpc.InferenceServiceStub(channel).Generate(request,
                                                                                   timeout=120)
            try:
                next(call)
                streams.append(call)
                time.sleep(2)  # read, not finished
                call.cancel()
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refusals.append(e.details())

    try:
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(one, range(12)))
        assert refusals, "the burst fitted in 2 places"
        assert all(r.startswith("2 generation streams are open (limits.max_queued_requests): ")
                   for r in refusals), refusals
        assert not any("finished but not yet read" in r for r in refusals), refusals
    finally:
        stop_daemon(d)


def test_one_client_holds_at_most_its_share_of_the_streams(tmp_path, stubs):
    """limits.max_streams_per_client: a client (without tokens, its connection) with that many
    streams open is refused another, saying so, while another client is served; the place comes
    back when one of its streams ends."""
    pb = stubs.inference_pb2
    d = start_daemon(tmp_path, "--set", "limits.max_streams_per_client=2",
                     "--set", "limits.max_new_tokens=100000",
                     model=long_context_model(tmp_path / "long-model"))

    def channel():  # a connection of its own: without tokens, a client is its connection
        return grpc.insecure_channel(d.grpc_address, options=[("grpc.use_local_subchannel_pool", 1)])

    endless = pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(
        max_new_tokens=100000, ignore_eos=True))
    short = pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(max_new_tokens=2))
    try:
        with channel() as busy, channel() as other:
            busy_stub = stubs.inference_pb2_grpc.InferenceServiceStub(busy)
            held = [busy_stub.Generate(endless, timeout=120) for _ in range(2)]
            for call in held:
                next(call)  # open and decoding
            with pytest.raises(grpc.RpcError) as err:
                list(busy_stub.Generate(short, timeout=30))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = err.value.details()
            assert details.startswith("this client (ipv"), details
            assert details.endswith(
                ") has 2 generation streams open, the most one client may "
                "(limits.max_streams_per_client); retry when one of them has ended"), details
            other_stub = stubs.inference_pb2_grpc.InferenceServiceStub(other)
            assert sum(len(c.tokens) for c in other_stub.Generate(short, timeout=30)) == 2
            held[0].cancel()
            deadline = time.time() + 10
            while True:  # its place is given back once the call is done on the server too
                try:
                    assert sum(len(c.tokens) for c in busy_stub.Generate(short, timeout=30)) == 2
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.time() < deadline
                    time.sleep(0.1)
            held[1].cancel()
    finally:
        stop_daemon(d)
