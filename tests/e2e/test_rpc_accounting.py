"""lorad_rpc_requests_total counts each call once, under the code its client saw: calls ended
before their request arrived, out of time, cancelled, or refused for bad input (real daemon, real
gRPC and curl clients)."""
import time

import grpc
import pytest

from conftest import start_daemon, stop_daemon
from test_inference_service import collect, server  # noqa: F401 (fixtures)


def rpc_count(daemon, method, code):
    from prometheus_client.parser import text_string_to_metric_families

    _, text = daemon.http_get("/metrics")
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (s.name == "lorad_rpc_requests_total" and s.labels.get("method") == method
                    and s.labels.get("code") == code):
                return s.value
    return 0


def rpc_codes(daemon, methods):
    """lorad_rpc_requests_total of `methods` by code, summed over the methods."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for family in text_string_to_metric_families(daemon.http_get("/metrics")[1]):
        for s in family.samples:
            if s.name == "lorad_rpc_requests_total" and s.labels.get("method") in methods:
                counts[s.labels["code"]] = counts.get(s.labels["code"], 0) + s.value
    return counts


def rise(before, after):
    return {code: n - before.get(code, 0) for code, n in after.items()
            if n != before.get(code, 0)}


def test_calls_ended_before_their_request_arrived_are_not_counted_unimplemented(server):
    """gRPC answers UNIMPLEMENTED itself for a call cancelled or out of time before its request
    was read; the client sees CANCELLED or DEADLINE_EXCEEDED, and so must the metrics (an alert
    on UNIMPLEMENTED is for clients built against the wrong API)."""
    from concurrent.futures import ThreadPoolExecutor

    d, stub, pb, _, _, _ = server
    req = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_new_tokens=8))
    before = {m: rpc_count(d, f"lorad.v1.InferenceService/{m}", "UNIMPLEMENTED")
              for m in ("Generate", "Chat")}

    def one(i):
        try:
            if i % 3 == 0:
                stub.Generate(req, timeout=30).cancel()
            elif i % 3 == 1:
                collect(stub.Generate(req, timeout=0.001 + 0.001 * (i % 2)))
            else:
                chat = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")],
                                      sampling=req.sampling)
                collect(stub.Chat(chat, timeout=0.001))
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED), e

    methods = ("lorad.v1.InferenceService/Generate", "lorad.v1.InferenceService/Chat")
    codes_before = rpc_codes(d, methods)
    for _ in range(3):
        with ThreadPoolExecutor(100) as pool:
            list(pool.map(one, range(100)))
    time.sleep(1.0)  # the server's side of the last calls ends after the client's
    # A call is counted once, if it reached the server, under the code its client saw (OK for
    # one that ended before its cancel); neither UNIMPLEMENTED nor the INVALID_ARGUMENT lorad
    # gives requests gRPC could not decode.
    counted = rise(codes_before, rpc_codes(d, methods))
    assert 0 < sum(counted.values()) <= 300, counted
    assert set(counted) <= {"CANCELLED", "DEADLINE_EXCEEDED", "OK"}, counted
    after = {m: rpc_count(d, f"lorad.v1.InferenceService/{m}", "UNIMPLEMENTED")
             for m in ("Generate", "Chat")}
    assert after == before


def test_a_request_that_is_not_utf8_is_refused_naming_what_was_wrong(server):
    """A prompt of Latin-1 bytes (what a script reading a file in another encoding sends through
    a client that does not check): gRPC cannot decode the request (protobuf's strings are UTF-8)
    and answered a bare UNIMPLEMENTED, which reads as a client built against the wrong API. It is
    INVALID_ARGUMENT naming the message type and the likely cause, and counted so."""
    d, _, pb, _, _, _ = server
    method = "lorad.v1.InferenceService/Generate"
    before = rpc_count(d, method, "INVALID_ARGUMENT")
    latin1 = b"caf\xe9"
    raw = b"\x0a" + bytes([len(latin1)]) + latin1  # field 1 (prompt), length-delimited
    channel = grpc.insecure_channel(d.grpc_address)
    generate = channel.unary_stream("/" + method, request_serializer=lambda b: b,
                                    response_deserializer=pb.GenerateChunk.FromString)
    with pytest.raises(grpc.RpcError) as err:
        list(generate(raw, timeout=30))
    channel.close()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "could not be read as a lorad.v1.GenerateRequest" in err.value.details()
    assert "not UTF-8" in err.value.details()
    deadline = time.time() + 10
    while rpc_count(d, method, "INVALID_ARGUMENT") == before and time.time() < deadline:
        time.sleep(0.05)
    assert rpc_count(d, method, "INVALID_ARGUMENT") == before + 1


def test_calls_out_of_time_are_counted_deadline_exceeded_never_cancelled(server):
    """Calls whose few-millisecond deadline passes, many before their request arrives: the
    client sees DEADLINE_EXCEEDED, and so do the metrics (a quarter were counted CANCELLED: gRPC's
    deadline timer fires a little before the deadline the context reports)."""
    from concurrent.futures import ThreadPoolExecutor

    d, stub, pb, _, _, _ = server
    # Long enough that none can finish in time.
    req = pb.GenerateRequest(prompt="hello",
                             sampling=pb.SamplingParams(max_new_tokens=200, ignore_eos=True))
    method = "lorad.v1.InferenceService/Generate"
    codes_before = rpc_codes(d, (method,))

    def one(i):
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.Generate(req, timeout=0.001 * (1 + i % 10)))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value

    with ThreadPoolExecutor(50) as pool:
        list(pool.map(one, range(300)))
    time.sleep(1.0)  # the server's side of the last calls ends after the client's
    counted = rise(codes_before, rpc_codes(d, (method,)))
    assert set(counted) == {"DEADLINE_EXCEEDED"} and 0 < counted["DEADLINE_EXCEEDED"] <= 300, \
        counted


def test_a_passed_deadline_is_deadline_exceeded_never_ok(tmp_path, stubs):
    """Whichever notices first, gRPC's timer or the engine's own deadline check, the call ends as
    DEADLINE_EXCEEDED: never OK with cut output, never counted as a client's cancel. One request
    decodes at a time here, so requests queued behind a backlog outlive their deadlines."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    d = start_daemon(tmp_path, "--set", "model.base_weights=none",
                     "--set", "engine.max_running_requests=1")
    pb = stubs.inference_pb2
    method = "lorad.v1.InferenceService/Generate"
    long_req = pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(
        max_new_tokens=4000, ignore_eos=True))
    try:
        with grpc.insecure_channel(d.grpc_address) as channel, ThreadPoolExecutor(40) as pool:
            stub = stubs.inference_pb2_grpc.InferenceServiceStub(channel)
            backlog = [pool.submit(lambda: collect(stub.Generate(long_req, timeout=300)))
                       for _ in range(40)]
            started = time.time()
            while rpc_count(d, method, "OK") < 1:  # the backlog is being served
                assert time.time() - started < 120, d.log()
                time.sleep(0.01)
            # Long enough to reach the server on a loaded machine, far shorter than the backlog.
            for timeout in (2.0, 3.0):
                with pytest.raises(grpc.RpcError) as err:
                    collect(stub.Generate(long_req, timeout=timeout))
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for f in backlog:
                f.result()
        deadline = time.time() + 30
        while rpc_count(d, method, "DEADLINE_EXCEEDED") < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert rpc_count(d, method, "DEADLINE_EXCEEDED") == 2, d.http_get("/metrics")[1]
        assert rpc_count(d, method, "OK") == 40
        assert rpc_count(d, method, "CANCELLED") == 0
    finally:
        stop_daemon(d)


def test_a_deadline_centuries_away_is_no_deadline(server):
    """grpc-timeout's largest value (99999999H, 11,415 years; no gRPC library sends it, so curl
    sends the call): gRPC's C++ deadline counts nanoseconds since 1970 in 64 bits, and wrapped
    this one to a time long past: the call ended at once as DEADLINE_EXCEEDED. It is no
    deadline."""
    import subprocess

    d, _, pb, _, _, _ = server
    message = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(
        max_new_tokens=3, ignore_eos=True)).SerializeToString()
    framed = b"\x00" + len(message).to_bytes(4, "big") + message
    result = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-X", "POST",
         "-H", "content-type: application/grpc", "-H", "te: trailers",
         "-H", "grpc-timeout: 99999999H", "--data-binary", "@-",
         f"http://{d.grpc_address}/lorad.v1.InferenceService/Generate"],
        input=framed, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    chunks, body = [], result.stdout
    while body:
        size = int.from_bytes(body[1:5], "big")
        chunks.append(pb.GenerateChunk.FromString(body[5:5 + size]))
        body = body[5 + size:]
    assert chunks and chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH, chunks
    assert sum(len(c.tokens) for c in chunks) == 3, chunks
