"""Bearer tokens and roles over real gRPC: missing and wrong tokens are UNAUTHENTICATED, a user
token calling an admin method is PERMISSION_DENIED, and the daemon keeps serving; without tokens
the daemon refuses to listen beyond loopback unless told to."""
import os
import re
import shutil
import subprocess
import sys
import time

import grpc
import pytest

from conftest import BUILD, LORAD, ROOT, start_daemon, stop_daemon, tiny_model_path

ADMIN = "admin-token-0123456789abcdef"
USER = "user-token-0123456789abcdef"


@pytest.fixture
def secured(tmp_path, stubs):
    config = tmp_path / "lorad.yaml"
    config.write_text(
        "training:\n  max_running_jobs: 0\n"
        "limits:\n  max_new_tokens: 3\n"
        "auth:\n  tokens:\n"
        f"    - {{name: ops, role: admin, token: {ADMIN}}}\n"
        f"    - {{name: app, role: user, token: {USER}}}\n")
    root = tmp_path / "data" / "datasets"
    root.mkdir(parents=True)
    shutil.copy(ROOT / "tests/fixtures/qa_small.jsonl", root / "qa.jsonl")
    d = start_daemon(tmp_path, config=config)  # health needs no token
    channel = grpc.insecure_channel(d.grpc_address)
    yield d, channel
    channel.close()
    stop_daemon(d)


def bearer(token):
    return [("authorization", f"Bearer {token}")]


def code_of(call):
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_tokens_and_roles(secured, stubs):
    d, channel = secured
    tpb, ipb, apb = stubs.training_pb2, stubs.inference_pb2, stubs.adapters_pb2
    train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
    infer = stubs.inference_pb2_grpc.InferenceServiceStub(channel)
    adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
    spec = tpb.JobSpec(adapter_name="a", dataset=tpb.DatasetSpec(path="qa.jsonl"))
    submit = lambda md: lambda: train.SubmitJob(tpb.SubmitJobRequest(spec=spec), metadata=md,
                                                timeout=30)

    assert code_of(lambda: train.ListJobs(tpb.ListJobsRequest(), timeout=10))[0] == \
        grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: train.ListJobs(tpb.ListJobsRequest(), metadata=bearer("x" * 20),
                                          timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: train.ListJobs(tpb.ListJobsRequest(), metadata=[("authorization", USER)],
                                          timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
    code, details = code_of(submit(bearer(USER)))
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert code_of(submit(bearer(ADMIN)))[0] == grpc.StatusCode.OK
    code, details = code_of(lambda: train.DeleteJob(tpb.DeleteJobRequest(job_id="job-1"),
                                                    metadata=bearer(USER), timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert code_of(lambda: train.ListJobs(tpb.ListJobsRequest(), metadata=bearer(USER),
                                          timeout=10))[0] == grpc.StatusCode.OK
    assert code_of(lambda: list(train.WatchJob(tpb.WatchJobRequest(job_id="job-1"),
                                               timeout=10)))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: adapters.LoadAdapter(apb.LoadAdapterRequest(name="x", path="y"),
                                                metadata=bearer(USER), timeout=10))[0] == \
        grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=bearer(USER),
                                                 timeout=10))[0] == grpc.StatusCode.OK
    gen = ipb.GenerateRequest(prompt="hello", sampling=ipb.SamplingParams(max_new_tokens=2))
    assert code_of(lambda: list(infer.Generate(gen, timeout=30)))[0] == \
        grpc.StatusCode.UNAUTHENTICATED
    chunks = list(infer.Generate(gen, metadata=bearer(USER), timeout=30))
    assert chunks[-1].usage.completion_tokens >= 1
    # The caller is checked before any work on the request: a chat too large to render is
    # UNAUTHENTICATED without a token, and only with one is it refused for its size.
    many = ipb.ChatRequest(messages=[ipb.ChatMessage(role="user", content="")] * 5000)
    assert code_of(lambda: list(infer.Chat(many, timeout=30)))[0] == \
        grpc.StatusCode.UNAUTHENTICATED
    code, details = code_of(lambda: list(infer.Chat(many, metadata=bearer(USER), timeout=30)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "messages: 5000 messages" in details, details
    # max_new_tokens unset: the default (256) within limits.max_new_tokens (3), not refused.
    unset = ipb.GenerateRequest(prompt="hello", sampling=ipb.SamplingParams(ignore_eos=True))
    chunks = list(infer.Generate(unset, metadata=bearer(USER), timeout=30))
    assert chunks[-1].usage.completion_tokens == 3
    status, body = d.http_get("/metrics")
    assert 'code="UNAUTHENTICATED"' in body and 'code="PERMISSION_DENIED"' in body


def test_admin_calls_are_logged_with_the_name_of_their_token(secured, stubs):
    """Several admins share a lorad: who submitted, cancelled, deleted, loaded or unloaded what
    was nowhere (the log named the job, not the caller). Each admin call names its token."""
    d, channel = secured
    tpb, apb = stubs.training_pb2, stubs.adapters_pb2
    train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
    adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
    job = train.SubmitJob(tpb.SubmitJobRequest(spec=tpb.JobSpec(
        adapter_name="audited", dataset=tpb.DatasetSpec(path="qa.jsonl"))), metadata=bearer(ADMIN),
        timeout=30)
    train.CancelJob(tpb.CancelJobRequest(job_id=job.id), metadata=bearer(ADMIN), timeout=30)
    code, _ = code_of(lambda: adapters.UnloadAdapter(apb.UnloadAdapterRequest(name="x\nforged"),
                                                     metadata=bearer(ADMIN), timeout=30))
    log = d.log()
    assert "SubmitJob (adapter 'audited') by 'ops' (ipv4:127.0.0.1:" in log, log
    assert f"CancelJob {job.id} by 'ops'" in log, log
    assert "UnloadAdapter 'x?forged' by 'ops'" in log and "\nforged" not in log, log
    # Reads are not logged.
    train.ListJobs(tpb.ListJobsRequest(), metadata=bearer(USER), timeout=30)
    assert "by 'app'" not in d.log()


def test_refused_calls_are_logged_without_the_token_and_at_most_every_10_s(secured, stubs):
    """After tokens are rotated, the client still sending an old one is found in the log (nothing
    was logged: the client saw UNAUTHENTICATED, the operator saw nothing). A client retrying in a
    loop writes one line, then one every 10 s saying how many were held back."""
    d, channel = secured
    tpb = stubs.training_pb2
    train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
    old = "old-token-0123456789abcdef"
    for metadata in [bearer(old)] * 5 + [None] * 3:  # two reasons: a line for each
        code, _ = code_of(lambda: train.ListJobs(tpb.ListJobsRequest(), metadata=metadata,
                                                 timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    lines = [line for line in d.log().splitlines() if "refused a call from" in line]
    assert len(lines) == 2, lines
    assert "the bearer token is not valid" in lines[0] and "127.0.0.1" in lines[0], lines
    assert "missing bearer token" in lines[1], lines
    assert old not in d.log() and ADMIN not in d.log()


def test_loradctl_says_what_to_do_about_tokens_tls_and_its_listing_limit(secured, stubs,
                                                                         tmp_path):
    """Without a token loradctl relayed the server's text about gRPC metadata (not --token); a TLS
    client at a plaintext port got gRPC's own log line before its error and no hint; and
    `train ls` left out every job past its limit without a word."""
    d, channel = secured
    tpb = stubs.training_pb2
    train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
    for name in ("one", "two", "three"):
        train.SubmitJob(tpb.SubmitJobRequest(spec=tpb.JobSpec(
            adapter_name=name, dataset=tpb.DatasetSpec(path="qa.jsonl"))), metadata=bearer(ADMIN),
            timeout=30)
    env = {k: v for k, v in os.environ.items()
           if k not in ("LORAD_ADDRESS", "LORAD_TOKEN", "LORAD_TOKEN_FILE")}

    def ctl(*args):
        return subprocess.run([str(BUILD / "clients" / "loradctl"), "--address", d.grpc_address,
                               *args], capture_output=True, text=True, env=env, timeout=60)

    none = ctl("train", "ls")
    assert none.returncode == 26 and none.stderr.count("\n") == 1, none.stderr
    assert "(give --token or --token-file, or set LORAD_TOKEN)" in none.stderr, none.stderr
    wrong = ctl("--token", "wrong-token-0123456789abcdef", "train", "ls")
    assert "(the token given is not one of the daemon's auth.tokens)" in wrong.stderr, wrong.stderr
    cut = ctl("--token", USER, "train", "ls", "--limit", "2")
    assert cut.returncode == 0 and len(cut.stdout.strip().splitlines()) == 3, cut.stdout
    assert cut.stderr == "(the newest 2 shown; older ones: --limit 4)\n", cut.stderr
    whole = ctl("--token", USER, "train", "ls", "--limit", "3")
    assert whole.returncode == 0 and whole.stderr == "", whole.stderr
    cert, _ = make_certificate(tmp_path, "client-side")
    tls = ctl("--ca-cert", str(cert), "--token", USER, "adapters", "ls")
    assert tls.returncode == 24 and tls.stderr.count("\n") == 1, tls.stderr
    assert tls.stderr.startswith("loradctl: UNAVAILABLE: cannot reach lorad at "), tls.stderr
    assert "lorad there serves plaintext: leave out --ca-cert" in tls.stderr, tls.stderr


def test_loradctl_reads_its_token_from_a_file(secured, tmp_path):
    """--token was the only way to give a token on the command line, and other accounts see it
    in ps: --token-file (or LORAD_TOKEN_FILE) reads it from a file, without the line ending an
    editor or echo leaves, and says when the file is readable by others."""
    d, _ = secured
    env = {k: v for k, v in os.environ.items()
           if k not in ("LORAD_ADDRESS", "LORAD_TOKEN", "LORAD_TOKEN_FILE")}

    def ctl(*args, extra_env=None):
        return subprocess.run([str(BUILD / "clients" / "loradctl"), "--address", d.grpc_address,
                               *args], capture_output=True, text=True,
                              env={**env, **(extra_env or {})}, timeout=60)

    private = tmp_path / "token"
    private.write_bytes(USER.encode() + b"\r\n")
    private.chmod(0o600)
    by_flag = ctl("--token-file", str(private), "train", "ls")
    assert by_flag.returncode == 0 and by_flag.stderr == "", by_flag.stderr
    by_env = ctl("adapters", "ls", extra_env={"LORAD_TOKEN_FILE": str(private)})
    assert by_env.returncode == 0 and by_env.stderr == "", by_env.stderr

    shared = tmp_path / "shared-token"
    shared.write_text(USER + "\n")
    shared.chmod(0o644)
    warned = ctl("--token-file", str(shared), "train", "ls")
    assert warned.returncode == 0, warned.stderr
    assert warned.stderr == (f"loradctl: warning: the token file {shared} is readable by other "
                             f"accounts (chmod 600 {shared})\n"), warned.stderr

    wrong = tmp_path / "wrong-token"
    wrong.write_text("wrong-token-0123456789abcdef\n")
    refused = ctl("--token-file", str(wrong), "train", "ls")
    assert refused.returncode == 26, refused.stderr
    assert "(the token given is not one of the daemon's auth.tokens)" in refused.stderr

    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    for args, extra, says in [
        (["--token-file", str(empty)], None, f"the token file {empty} (given by --token-file or "
                                             "LORAD_TOKEN_FILE) is empty"),
        (["--token-file", str(tmp_path / "absent")], None,
         f"cannot read the token file {tmp_path / 'absent'} (given by --token-file or "
         "LORAD_TOKEN_FILE): No such file or directory"),
        (["--token", USER, "--token-file", str(private)], None,
         "give a token (--token or LORAD_TOKEN) or a token file (--token-file or "
         "LORAD_TOKEN_FILE), not both"),
        ([], {"LORAD_TOKEN": USER, "LORAD_TOKEN_FILE": str(private)},
         "give a token (--token or LORAD_TOKEN) or a token file (--token-file or "
         "LORAD_TOKEN_FILE), not both"),
    ]:
        failed = ctl(*args, "train", "ls", extra_env=extra)
        assert failed.returncode == 2 and failed.stdout == "", failed.stderr
        assert failed.stderr.startswith("loradctl: " + says), failed.stderr
    # One on the command line wins over the other's environment variable.
    for args, extra in [(["--token-file", str(private)], {"LORAD_TOKEN": "stale-0123456789"}),
                        (["--token-file", str(private)], {"LORAD_TOKEN": "crlf-0123456789\r"}),
                        (["--token", USER], {"LORAD_TOKEN_FILE": str(wrong)})]:
        overridden = ctl(*args, "train", "ls", extra_env=extra)
        assert overridden.returncode == 0, (args, overridden.stderr)
    # A byte order mark some editors save first is not part of the token.
    marked = tmp_path / "bom-token"
    marked.write_bytes(b"\xef\xbb\xbf" + USER.encode() + b"\r\n")
    marked.chmod(0o600)
    assert ctl("--token-file", str(marked), "train", "ls").returncode == 0
    spaced = tmp_path / "spaced-token"
    spaced.write_text("two words\n")
    failed = ctl("--token-file", str(spaced), "train", "ls")
    assert failed.returncode == 2 and "has white space" in failed.stderr, failed.stderr
    assert str(spaced) in failed.stderr, failed.stderr
    # The Python client example takes the same file.
    client = [sys.executable, str(ROOT / "clients" / "python" / "lorad_client.py"), "--address",
              d.grpc_address]
    py = subprocess.run(client + ["--token-file", str(private), "adapters"], capture_output=True,
                        text=True, env=env, timeout=120)
    assert py.returncode == 0 and py.stderr == "", py.stderr
    py = subprocess.run(client + ["adapters"], capture_output=True, text=True, timeout=120,
                        env={**env, "LORAD_TOKEN_FILE": str(private), "LORAD_TOKEN": USER})
    assert py.returncode == 2 and "not both" in py.stderr, py.stderr
    py = subprocess.run(client + ["--token-file", str(marked), "adapters"], capture_output=True,
                        text=True, timeout=120, env={**env, "LORAD_TOKEN": "stale-0123456789"})
    assert py.returncode == 0 and py.stderr == "", py.stderr


def test_debug_log_level_logs_each_call(tmp_path, stubs):
    """--log-level debug added nothing (no debug line anywhere): now a line a call, with its
    method, status code, duration and client."""
    d = start_daemon(tmp_path, "--log-level", "debug")
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            train.ListJobs(stubs.training_pb2.ListJobsRequest(), timeout=10)
            code, _ = code_of(lambda: train.GetJob(stubs.training_pb2.GetJobRequest(
                job_id="job-0000000000000000"), timeout=10))
            assert code == grpc.StatusCode.NOT_FOUND
    finally:
        stop_daemon(d)
    log = d.log()
    assert re.search(r"lorad\.v1\.TrainingService/ListJobs OK [0-9.]+ s ipv4:127\.0\.0\.1:", log), log
    assert "lorad.v1.TrainingService/GetJob NOT_FOUND" in log, log


def run_lorad(tmp_path, body, *args):
    config = tmp_path / "lorad.yaml"
    config.write_text(body)
    return subprocess.run([str(LORAD), "--config", str(config), "--model", tiny_model_path(),
                           "--data-dir", str(tmp_path / "data"), *args],
                          capture_output=True, text=True, timeout=60)


def test_remote_binding_without_tokens_is_refused(tmp_path):
    result = run_lorad(tmp_path, "server:\n  grpc_address: 0.0.0.0:50999\n")
    assert result.returncode == 2
    assert "server.grpc_address" in result.stderr and "auth.tokens" in result.stderr


def test_bad_tokens_exit_2_naming_the_line(tmp_path):
    result = run_lorad(tmp_path, "auth:\n  tokens:\n    - {name: a, role: root, token: x}\n")
    assert result.returncode == 2 and "lorad.yaml:3" in result.stderr and "role" in result.stderr
    result = run_lorad(tmp_path, "auth:\n  tokens:\n    - {name: a, role: user, token: short}\n")
    assert result.returncode == 2 and "lorad.yaml:3" in result.stderr
    assert "auth.tokens[0]" in result.stderr
    result = run_lorad(tmp_path, "auth:\n  tokens:\n"
                       f"    - {{name: a, role: user, token: {USER}}}\n"
                       f"    - {{name: a, role: admin, token: {ADMIN}}}\n")
    assert result.returncode == 2 and "lorad.yaml:4: auth.tokens[1].name: 'a'" in result.stderr


def make_certificate(folder, name, san="IP:127.0.0.1"):
    """A self-signed certificate for 127.0.0.1 (or `san`) and its unencrypted key, as PEM
    files."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", f"subjectAltName={san}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_tls_serves_and_bad_files_are_one_line_before_the_model_loads(tmp_path, stubs):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from conftest import free_port

    # Made out to a name, not the address: reached through 127.0.0.1 as through a tunnel.
    cert, key = make_certificate(tmp_path, "server", san="DNS:lorad.internal")
    _, other_key = make_certificate(tmp_path, "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for cert_file, key_file, words in ((cert, other_key, "lorad.yaml:3: server.tls_key_file"),
                                       (garbage, key, "lorad.yaml:2: server.tls_cert_file"),
                                       (cert, garbage, "lorad.yaml:3: server.tls_key_file")):
        result = run_lorad(tmp_path, f"server:\n  tls_cert_file: {cert_file}\n"
                                     f"  tls_key_file: {key_file}\n")
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr

    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "tls.yaml"
    config.write_text(f"server:\n  tls_cert_file: {cert}\n  tls_key_file: {key}\n")
    log = tmp_path / "tls.log"
    http_address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [str(LORAD), "--config", str(config), "--model", tiny_model_path(), "--data-dir",
         str(tmp_path / "data"), "--grpc-address", address, "--http-address", http_address],
        stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(address, credentials, options=[
                ("grpc.ssl_target_name_override", "lorad.internal")]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(600):
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    time.sleep(0.1)
            adapters = stubs.adapters_pb2_grpc.AdapterServiceStub(channel)
            assert list(adapters.ListAdapters(stubs.adapters_pb2.ListAdaptersRequest(),
                                              timeout=10).adapters) == []
        # The certificate's end, for an alert before clients refuse it (renewals:
        # test_tls_renewal.py): as openssl reads it.
        import calendar
        import urllib.request

        end = subprocess.run(["openssl", "x509", "-enddate", "-noout", "-in", str(cert)],
                             capture_output=True, text=True, check=True).stdout
        end = " ".join(end.split("=", 1)[1].split())  # "Dec 8 13:45:00 2026 GMT"
        expected = calendar.timegm(time.strptime(end, "%b %d %H:%M:%S %Y %Z"))
        from prometheus_client.parser import text_string_to_metric_families

        metrics = urllib.request.urlopen(f"http://{http_address}/metrics", timeout=10).read()
        values = [s.value for f in text_string_to_metric_families(metrics.decode())
                  for s in f.samples if s.name == "lorad_tls_certificate_expiry_timestamp_seconds"]
        assert values == [expected], values
        with grpc.insecure_channel(address) as plain:  # TLS only
            with pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
        # loradctl without --ca-cert at a TLS port says what is missing.
        plain_ctl = subprocess.run([str(BUILD / "clients" / "loradctl"), "--address", address,
                                    "adapters", "ls"], capture_output=True, text=True, timeout=60)
        assert plain_ctl.returncode == 24, plain_ctl.stderr
        assert "give --ca-cert" in plain_ctl.stderr, plain_ctl.stderr
        # The Python client example too, with the same two arguments.
        py = subprocess.run([sys.executable, str(ROOT / "clients" / "python" / "lorad_client.py"),
                             "--address", address, "--ca-cert", str(cert), "--tls-server-name",
                             "lorad.internal", "adapters"], capture_output=True, text=True,
                            timeout=120)
        assert py.returncode == 0 and py.stdout == "", py.stderr
        # The certificate names another host than the address's: --tls-server-name says which.
        tls_ctl = [str(BUILD / "clients" / "loradctl"), "--address", address, "--ca-cert",
                   str(cert)]
        wrong_name = subprocess.run(tls_ctl + ["adapters", "ls"], capture_output=True, text=True,
                                    timeout=60)
        assert wrong_name.returncode == 24, wrong_name.stderr
        named = subprocess.run(tls_ctl + ["--tls-server-name", "lorad.internal", "adapters", "ls"],
                               capture_output=True, text=True, timeout=60)
        assert named.returncode == 0, named.stderr
        # Plaintext connections to the TLS port: gRPC wrote a line of its own for each (anyone
        # reaching the port could fill the log); they go through lorad's log, a line every 10 s.
        import socket

        for _ in range(30):
            with socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1]))) as c:
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                c.recv(100)
        failed = [line for line in log.read_text().splitlines() if "Handshake failed" in line]
        assert 1 <= len(failed) <= 3, failed
        assert all("[warning] grpc " in line for line in failed), failed
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    # The count of those held back was written only with a next such line, which never came: at
    # the latest the shutdown writes it.
    counts = [line for line in log.read_text().splitlines()
              if "more log line(s) like this one were held back: grpc " in line
              and "Handshake failed" in line]
    assert counts, log.read_text()[-3000:]
    held = sum(int(re.search(r"\] (\d+) more log line", line).group(1)) for line in counts)
    assert held >= 20, counts
