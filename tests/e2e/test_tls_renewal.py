"""A renewed TLS certificate is served without a restart (real daemon, real gRPC clients): new
connections get the new certificate, connections made before keep working, a half-renewed pair on
disk (the key replaced before the certificate) is never served, and the expiry gauge follows."""
import calendar
import os
import subprocess
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import LORAD, free_port, tiny_model_path


def make_certificate(folder, name, days):
    """A self-signed certificate for the name lorad.internal, valid for `days`, and its key."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
                    "-subj", "/CN=lorad.internal", "-addext", "subjectAltName=DNS:lorad.internal",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def end_of(cert):
    end = subprocess.run(["openssl", "x509", "-enddate", "-noout", "-in", str(cert)],
                         capture_output=True, text=True, check=True).stdout
    end = " ".join(end.split("=", 1)[1].split())  # "Dec 8 13:45:00 2026 GMT"
    return calendar.timegm(time.strptime(end, "%b %d %H:%M:%S %Y %Z"))


def new_channel(address, trusted):
    """A channel of its own connection (no subchannel shared with others of this process), that
    trusts only the certificate `trusted`."""
    return grpc.secure_channel(
        address, grpc.ssl_channel_credentials(root_certificates=trusted.read_bytes()),
        options=[("grpc.ssl_target_name_override", "lorad.internal"),
                 ("grpc.use_local_subchannel_pool", 1)])


def healthy(channel, timeout=5):
    try:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout).status == \
            health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def wait_for_line(log, text, timeout=30):
    """Waits until the daemon's log holds `text` (a reload happens every second here)."""
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert time.time() < deadline, log.read_text()
        time.sleep(0.2)


def expiry_gauge(http_address):
    from prometheus_client.parser import text_string_to_metric_families

    metrics = urllib.request.urlopen(f"http://{http_address}/metrics", timeout=10).read()
    return [s.value for f in text_string_to_metric_families(metrics.decode())
            for s in f.samples if s.name == "lorad_tls_certificate_expiry_timestamp_seconds"]


def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(tmp_path):
    served_cert, served_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first_cert, first_key = make_certificate(tmp_path, "first", days=1)
    renewed_cert, renewed_key = make_certificate(tmp_path, "renewed", days=30)
    served_cert.write_bytes(first_cert.read_bytes())
    served_key.write_bytes(first_key.read_bytes())
    os.chmod(served_key, 0o600)
    config = tmp_path / "lorad.yaml"
    config.write_text(f"server:\n  tls_cert_file: {served_cert}\n  tls_key_file: {served_key}\n"
                      "  tls_reload_seconds: 1\n")
    address, http_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    log = tmp_path / "lorad.log"
    proc = subprocess.Popen(
        [str(LORAD), "--config", str(config), "--model", tiny_model_path(), "--data-dir",
         str(tmp_path / "data"), "--grpc-address", address, "--http-address", http_address],
        stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        before = new_channel(address, first_cert)
        deadline = time.time() + 120
        while not healthy(before, timeout=1):
            assert time.time() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert expiry_gauge(http_address) == [end_of(first_cert)]

        # The renewal half done: the new key beside the old certificate. lorad keeps the pair it
        # serves and says why; gRPC's own file watcher would have served the two.
        served_key.write_bytes(renewed_key.read_bytes())
        wait_for_line(log, "is not the key of the certificate")
        with new_channel(address, first_cert) as channel:
            assert healthy(channel), log.read_text()
        assert expiry_gauge(http_address) == [end_of(first_cert)]

        served_cert.write_bytes(renewed_cert.read_bytes())
        deadline = time.time() + 30
        while True:
            with new_channel(address, renewed_cert) as channel:
                if healthy(channel, timeout=2):
                    break
            assert time.time() < deadline, log.read_text()
            time.sleep(0.2)
        with new_channel(address, first_cert) as channel:
            assert not healthy(channel), "a new connection still got the old certificate"
        assert healthy(before), "a connection made before the renewal was dropped"
        before.close()
        # A chain file cut off after its first certificate (a copy in place, half done): the
        # first certificate and the key check out, and every handshake failed once it served.
        served_cert.write_bytes(renewed_cert.read_bytes() + first_cert.read_bytes()[:700])
        wait_for_line(log, "a certificate after the first cannot be read")
        with new_channel(address, renewed_cert) as channel:
            assert healthy(channel), log.read_text()
        assert expiry_gauge(http_address) == [end_of(renewed_cert)]
        lines = log.read_text().splitlines()
        renewed = [line for line in lines if "renewed: new connections get the certificate" in line]
        assert len(renewed) == 1 and "[info]" in renewed[0], lines
        refused = [line for line in lines if "is not the key of the certificate" in line]
        assert len(refused) == 1 and "[warning]" in refused[0], refused
        assert "still serving the certificate read before" in refused[0], refused
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_without_proc_the_certificate_is_served_as_read_at_start(tmp_path):
    """gRPC reads the served pair through /proc/self/fd: where /proc is masked (a chroot, a
    sandbox without it, systemd's InaccessiblePaths=/proc), lorad serves the pair read at start,
    saying it is not reloaded. Every handshake failed there while lorad said it served."""
    import shutil as sh

    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs none /proc"], capture_output=True)
    if sh.which("unshare") is None or probe.returncode != 0:
        import pytest

        pytest.skip(f"cannot mask /proc here (needs CAP_SYS_ADMIN): {probe.stderr!r}")
    cert, key = make_certificate(tmp_path, "served", days=1)
    config = tmp_path / "lorad.yaml"
    config.write_text(f"server:\n  tls_cert_file: {cert}\n  tls_key_file: {key}\n")
    address, http_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    log = tmp_path / "lorad.log"
    lorad = " ".join([str(LORAD), "--config", str(config), "--model", tiny_model_path(),
                      "--data-dir", str(tmp_path / "data"), "--grpc-address", address,
                      "--http-address", http_address])
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                             f"mount -t tmpfs none /proc && exec {lorad}"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        with new_channel(address, cert) as channel:
            deadline = time.time() + 120
            while not healthy(channel, timeout=1):
                assert time.time() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.2)
        assert "TLS: the certificate is served as read at start and not reloaded (/proc/self/fd/" \
            in log.read_text(), log.read_text()
        assert expiry_gauge(http_address) == [end_of(cert)]
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
