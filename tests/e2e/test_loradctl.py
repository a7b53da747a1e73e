"""loradctl, the C++ CLI, run as a subprocess against a real lorad daemon: submit a job from
YAML, list, show, cancel and watch it; YAML mistakes are reported with the key and line; an
unreachable daemon and services not built yet fail with one clean line and a distinct exit code.
A small in-process fake TrainingService covers what the daemon cannot show yet (bearer tokens,
a job that succeeds or fails while watched)."""
import json
import os
import re
import shutil
import subprocess
import textwrap
import time
from concurrent import futures

import grpc
import pytest
import yaml

from conftest import BUILD, ROOT, free_port, start_daemon, stop_daemon

LORADCTL = BUILD / "clients" / "loradctl"
QA = ROOT / "tests/fixtures/qa_small.jsonl"

# exit_codes.h: 2 usage, 3 job failed, 4 job cancelled, 10 + gRPC status code.
EXIT_USAGE, EXIT_JOB_FAILED, EXIT_JOB_CANCELLED = 2, 3, 4
EXIT_NOT_FOUND, EXIT_UNAVAILABLE = 15, 24

JOB_YAML = """\
adapter_name: qa-yaml
dataset:
  path: qa.jsonl
  format: qa
lora:
  r: 8
  alpha: 32
  target_modules: [q_proj, v_proj]
  rslora: true
training:
  max_steps: 100000      # never finishes before the test cancels it
  learning_rate: 1.234567891e-4   # every digit survives train show --spec
  schedule: cosine
  optimizer: adamw
  gradient_checkpointing: false
  seed: 7
priority: 3
"""


def loradctl(*args, address=None, env=None, stdin=None, timeout=60):
    full_env = {k: v for k, v in os.environ.items() if k not in ("LORAD_ADDRESS", "LORAD_TOKEN")}
    full_env.update(env or {})
    prefix = ["--address", address] if address else []
    return subprocess.run([str(LORADCTL), *prefix, *args], capture_output=True, text=True,
                          input=stdin, env=full_env, timeout=timeout)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loradctl")
    d = start_daemon(tmp)
    root = tmp / "data" / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(QA, root / "qa.jsonl")
    yield d
    stop_daemon(d)


@pytest.fixture
def job_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB_YAML)
    return path


def test_submit_list_show_watch_cancel_delete(daemon, job_file, stubs):
    pb = stubs.training_pb2
    submitted = loradctl("train", "submit", str(job_file), address=daemon.grpc_address)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert re.fullmatch(r"job-\S+", job_id), submitted.stdout

    # Every YAML key reached the daemon, enums and aliases included.
    with grpc.insecure_channel(daemon.grpc_address) as channel:
        stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)
    spec = job.spec
    assert spec.adapter_name == "qa-yaml" and spec.priority == 3
    assert spec.dataset.format == pb.DATASET_FORMAT_QA and spec.dataset.path.endswith("qa.jsonl")
    assert (spec.lora.r, spec.lora.alpha, spec.lora.use_rslora) == (8, 32, True)
    assert list(spec.lora.target_modules) == ["q_proj", "v_proj"]
    t = spec.training
    assert (t.max_steps, t.learning_rate, t.seed) == (100000, 1.234567891e-4, 7)
    assert t.schedule == pb.LR_SCHEDULE_COSINE and t.optimizer == pb.OPTIMIZER_ADAMW
    assert t.HasField("gradient_checkpointing") and not t.gradient_checkpointing

    listed = loradctl("train", "ls", address=daemon.grpc_address)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "ADAPTER", "STEP", "LOSS", "CREATED"]
    row = next(r for r in rows if r.startswith(job_id))
    assert row.split()[1] in ("queued", "running") and row.split()[2] == "qa-yaml"
    # Times carry their zone (local and unlabelled, they did not match the server's log or
    # --json's UTC, and ran backwards across a DST change); a POSIX TZ needs no zone files.
    zoned = loradctl("train", "ls", address=daemon.grpc_address, env={"TZ": "XYZ+5"})
    row = next(r for r in zoned.stdout.splitlines() if r.startswith(job_id))
    assert re.search(r" \d{4}-\d\d-\d\d \d\d:\d\d:\d\d XYZ$", row), row
    # The daemon's log lines carry their UTC offset too.
    assert re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [+-]\d\d:?\d\d\] \[[a-z]+\] ",
                    daemon.log()), daemon.log()[:200]

    shown = loradctl("train", "show", job_id, address=daemon.grpc_address)
    assert shown.returncode == 0, shown.stderr
    assert f"id: {job_id}\n" in shown.stdout and "adapter: qa-yaml\n" in shown.stdout
    # The spec block is job YAML again: what was submitted, plus the daemon's defaults.
    shown_spec = yaml.safe_load(textwrap.dedent(shown.stdout.split("spec:\n", 1)[1]))
    assert shown_spec["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert shown_spec["training"]["schedule"] == "cosine" and shown_spec["priority"] == 3

    # --spec prints a job file: submitted again, it makes a job with the same spec.
    spec_only = loradctl("train", "show", "--spec", job_id, address=daemon.grpc_address)
    assert spec_only.returncode == 0, spec_only.stderr
    again_file = job_file.parent / "again.yaml"
    again_file.write_text(spec_only.stdout)
    again = loradctl("train", "submit", str(again_file), address=daemon.grpc_address)
    assert again.returncode == 0, again.stderr
    with grpc.insecure_channel(daemon.grpc_address) as channel:
        stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        resubmitted = stub.GetJob(pb.GetJobRequest(job_id=again.stdout.strip()), timeout=10)
        stub.CancelJob(pb.CancelJobRequest(job_id=resubmitted.id), timeout=10)
    assert resubmitted.spec == job.spec

    cancelled = loradctl("train", "cancel", job_id, address=daemon.grpc_address)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"{job_id}: cancelled"
    # Retried once its trainer has stopped, it is queued again; then cancelled for good.
    for _ in range(300):
        retried = loradctl("train", "retry", job_id, address=daemon.grpc_address)
        if "still stopping" not in retried.stderr:
            break
        time.sleep(0.1)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"{job_id}: queued"
    assert loradctl("train", "cancel", job_id, address=daemon.grpc_address).returncode == 0
    as_json = loradctl("train", "show", "--json", job_id, address=daemon.grpc_address)
    assert '"state": "JOB_STATE_CANCELLED"' in as_json.stdout
    # Zeros are printed, not left out (a script reading a count found no key).
    assert json.loads(as_json.stdout)["spec"]["dataset"]["packing"] is False, as_json.stdout

    only_cancelled = loradctl("train", "ls", "--state", "cancelled", address=daemon.grpc_address)
    assert job_id in only_cancelled.stdout
    listed = loradctl("train", "ls", "--json", "--state", "cancelled",
                      address=daemon.grpc_address)
    assert listed.returncode == 0, listed.stderr
    assert job_id in [j["id"] for j in json.loads(listed.stdout)["jobs"]], listed.stdout
    only_queued = loradctl("train", "ls", "--state", "queued", address=daemon.grpc_address)
    assert job_id not in only_queued.stdout

    # Watching a cancelled job replays its history (one line per event off a terminal) and
    # exits with the "cancelled" code, so scripts can tell it from success.
    watched = loradctl("train", "watch", job_id, address=daemon.grpc_address)
    assert watched.returncode == EXIT_JOB_CANCELLED, watched.stderr
    assert watched.stdout.splitlines()[-1] == "state cancelled"

    removed = loradctl("train", "rm", job_id, address=daemon.grpc_address)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip() == f"{job_id}: deleted"
    gone = loradctl("train", "show", job_id, address=daemon.grpc_address)
    assert gone.returncode == EXIT_NOT_FOUND and job_id in gone.stderr, gone.stderr


def test_a_submit_run_again_with_its_request_id_names_the_same_job(daemon, job_file):
    """A script that submits again after a failure (a lost reply, a passed deadline) with the
    same --request-id gets the job the first call queued, not a second one."""
    address = daemon.grpc_address
    first = loradctl("train", "submit", str(job_file), "--request-id", "nightly-1",
                     address=address)
    assert first.returncode == 0, first.stderr
    again = loradctl("train", "submit", str(job_file), "--request-id", "nightly-1",
                     address=address)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    other = job_file.parent / "other.yaml"
    other.write_text(job_file.read_text().replace("qa-yaml", "qa-other"))
    clash = loradctl("train", "submit", str(other), "--request-id", "nightly-1", address=address)
    assert clash.returncode != 0
    assert "request_id 'nightly-1' queued job '" + first.stdout.strip() in clash.stderr
    listed = loradctl("train", "ls", address=address)
    assert listed.stdout.count(first.stdout.strip()) == 1
    assert "qa-other" not in listed.stdout
    assert loradctl("train", "cancel", first.stdout.strip(), address=address).returncode == 0
    # Run again once its job has ended: nothing new is queued, and the command says so.
    ended = loradctl("train", "submit", str(job_file), "--request-id", "nightly-1",
                     address=address)
    assert ended.returncode == EXIT_JOB_CANCELLED, ended.stderr
    assert ended.stdout == first.stdout
    assert "which has ended (cancelled); nothing new was queued" in ended.stderr


def test_inline_examples_are_written_as_yaml_records(daemon, tmp_path, stubs):
    pb = stubs.training_pb2
    path = tmp_path / "inline.yaml"
    path.write_text(textwrap.dedent("""\
        adapter_name: inline-qa
        dataset:
          format: qa
          inline_examples:
            - {question: "What is 2+2?", answer: "4"}
            - question: Capital of France?
              answer: Paris
            - question: Is the sky blue?
              answer: yes
              input:
            - {question: "6*7?", answer: 42}
        training:
          max_steps: 100000
          seed:
        """))
    # (`seed:` with no value keeps the default, as a key with no value does in lorad.yaml.)
    # Given on stdin ("-"), as a job file on the host reaches loradctl in a container.
    result = loradctl("train", "submit", "-", stdin=path.read_text(), address=daemon.grpc_address)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    with grpc.insecure_channel(daemon.grpc_address) as channel:
        stub = stubs.training_pb2_grpc.TrainingServiceStub(channel)
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)
        stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=10)
    assert [json.loads(e.json) for e in job.spec.dataset.inline_examples] == [
        {"question": "What is 2+2?", "answer": "4"},
        {"question": "Capital of France?", "answer": "Paris"},
        # Record fields are text: YAML 1.1's `yes` and numbers stay as written.
        {"question": "Is the sky blue?", "answer": "yes", "input": None},
        {"question": "6*7?", "answer": "42"},
    ]


def test_unknown_job_is_not_found(daemon):
    result = loradctl("train", "show", "job-does-not-exist", address=daemon.grpc_address)
    assert result.returncode == EXIT_NOT_FOUND
    assert result.stderr.startswith("loradctl: NOT_FOUND: ")


def test_spec_rejected_by_the_daemon_names_the_field(daemon, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapter_name: qa\ndataset: {path: qa.jsonl}\ntraining: {learning_rate: 5}\n")
    result = loradctl("train", "submit", str(bad), address=daemon.grpc_address)
    assert result.returncode == 13  # 10 + INVALID_ARGUMENT
    assert result.stderr.startswith("loradctl: INVALID_ARGUMENT: ")
    assert "training.learning_rate" in result.stderr


@pytest.mark.parametrize("body, line, words", [
    ("adapter_name: a\ntraining:\n  max_steps: 3\n  lerning_rate: 1e-4\n", 4,
     ["unknown key 'lerning_rate'", "learning_rate"]),
    ("adapter_name: a\nepochs: 2\n", 2, ["unknown key 'epochs'"]),
    ("adapter_name: a\ntraining:\n  max_steps: lots\n", 3,
     ["'training.max_steps' must be an integer", "'lots'"]),
    ("adapter_name: a\ntraining:\n  optimizer: sgd\n", 3, ["adamw_8bit", "'sgd'"]),
    ("lora:\n  target_modules: q_proj\n", 2, ["'lora.target_modules' must be a list"]),
    ("adapter_name: a\nadapter_name: b\n", 2, ["duplicate key 'adapter_name'"]),
    ("adapter_name: a\n---\nadapter_name: b\n", 3, ["second YAML document"]),
    ("adapter_name: a\n---\n---\nadapter_name: b\n", 4, ["second YAML document"]),
    ("adapter_name: a\ntraining:\n  micro_batch_size: 99999999999\n", 3,
     ["'training.micro_batch_size' must be an integer the field can hold (int32)"]),
    # Filled in by SubmitJob from init_adapter: a job file naming them trained something else.
    ("adapter_name: a\ninit_adapter: x\ninit_adapter_version: 1\n", 3,
     ["'init_adapter_version' is filled in by lorad", "init_adapter alone"]),
    ("adapter_name: a\ninit_adapter_path: /data/x\n", 2, ["'init_adapter_path' is filled in"]),
])
def test_yaml_mistakes_name_the_key_and_line(tmp_path, body, line, words):
    path = tmp_path / "job.yaml"
    path.write_text(body)
    # Nothing listens on this address: the file is rejected before any call is made.
    result = loradctl("train", "submit", str(path), address=f"127.0.0.1:{free_port()}")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.startswith(f"loradctl: {path}:{line}: "), result.stderr
    for word in words:
        assert word in result.stderr


def test_an_inline_example_of_nested_aliases_is_refused_before_it_expands(tmp_path):
    """A few hundred bytes of nested YAML aliases ("billion laughs") expanded to gigabytes (and
    crashed loradctl): a record over 4 MiB is refused, naming it."""
    lines = ["adapter_name: a", "dataset:", "  inline_examples:",
             "    - l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"      l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    result = loradctl("train", "submit", str(path), address=f"127.0.0.1:{free_port()}")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.startswith(f"loradctl: {path}:4: 'dataset.inline_examples[0]' expands to "
                                    "more than 4 MiB"), result.stderr


def test_many_records_naming_one_aliased_record_are_refused_before_they_expand(tmp_path):
    """Each record under 4 MiB, but thousands of records naming one of 10,000 aliased values
    expanded to gigabytes (and crashed loradctl): records past 256 MiB in all are refused."""
    lines = ["adapter_name: a", "dataset:", "  inline_examples:",
             "    - &r",
             "      l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"      l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 4)]
    lines += ["    - *r"] * 3000
    path = tmp_path / "many.yaml"
    path.write_text("\n".join(lines) + "\n")
    result = loradctl("train", "submit", str(path), address=f"127.0.0.1:{free_port()}")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "the records expand to more than 256 MiB in all" in result.stderr, result.stderr


def test_job_files_that_are_not_yaml_text_are_usage_errors(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    for path, words in [(binary, "not a text file"), (tmp_path, "not a regular file"),
                        (tmp_path / "missing.yaml", "no such file")]:
        result = loradctl("train", "submit", str(path), address=f"127.0.0.1:{free_port()}")
        assert result.returncode == EXIT_USAGE, result.stderr
        assert result.stderr.startswith(f"loradctl: {path}: {words}"), result.stderr


def test_flags_below_their_bound_say_the_bound():
    for args, bound in [(["train", "ls", "--limit", "0"], ">= 1"),
                        (["generate", "--max-new-tokens", "0", "hi"], ">= 1"),
                        (["--timeout", "-1", "adapters", "ls"], "0 .. 1e7 seconds"),
                        (["--timeout", "1e300", "adapters", "ls"], "0 .. 1e7 seconds")]:
        result = loradctl(*args, address=f"127.0.0.1:{free_port()}")
        assert result.returncode == EXIT_USAGE, result.stderr
        assert f"must be {bound}" in result.stderr and "17976931348623157" not in result.stderr
    for args, words in [(["train", "ls", "--limit", "abc"], "'abc' is not a number"),
                        (["bogus"], "unknown command 'bogus' (commands: train, adapters,"),
                        (["train", "bogus"], "unknown command 'bogus' (commands: submit, "),
                        (["generate", "--seed", "-5", "hi"], "'-5' is not a whole number"),
                        (["generate", "--seed", "18446744073709551616", "hi"], "2^64")]:
        result = loradctl(*args, address=f"127.0.0.1:{free_port()}")
        assert result.returncode == EXIT_USAGE and words in result.stderr, result.stderr
    # nan passed ">= 0" and set no deadline; inf overflowed the clock and failed every call.
    for value in ["nan", "inf"]:
        result = loradctl("--timeout", value, "adapters", "ls", address=f"127.0.0.1:{free_port()}")
        assert result.returncode == EXIT_USAGE, result.stderr
        assert f"'{value}' is not a number of seconds" in result.stderr, result.stderr
    result = loradctl("--address", "", "adapters", "ls")
    assert result.returncode == EXIT_USAGE and "is not host:port" in result.stderr, result.stderr
    for address in ["127.0.0.1:notaport", "127.0.0.1:99999", "127.0.0.1:0", "host:"]:
        result = loradctl("--address", address, "adapters", "ls")
        assert result.returncode == EXIT_USAGE, (address, result.stderr)
        assert "no valid port (1..65535)" in result.stderr, result.stderr
    # Forms gRPC would only answer with a DNS error: IPv6 without brackets, a URL's scheme. The
    # environment variable a value may come from is named.
    for address, words in [("::1:50051", "write [ADDRESS]:PORT"), ("::1", "write [ADDRESS]:PORT"),
                            ("http://127.0.0.1:50051", "leave out the scheme")]:
        result = loradctl("--address", address, "adapters", "ls")
        assert result.returncode == EXIT_USAGE and words in result.stderr, result.stderr
    result = loradctl("adapters", "ls", env={"LORAD_ADDRESS": "localhost"})
    assert result.returncode == EXIT_USAGE and "LORAD_ADDRESS" in result.stderr, result.stderr
    # gRPC's own target schemes pass the check (nothing listens there: UNAVAILABLE).
    for target in [f"passthrough:///127.0.0.1:{free_port()}", f"ipv4:127.0.0.1:{free_port()}",
                   f"dns:localhost:{free_port()}"]:
        result = loradctl("--address", target, "adapters", "ls")
        assert result.returncode == 24, (target, result.stderr)
    result = loradctl("--version")
    assert result.returncode == 0 and result.stdout.startswith("loradctl "), result.stdout
    # A token no gRPC header can carry (gRPC aborted the client, exit 134): a line ending read
    # from a token file with Windows line endings, or a letter outside ASCII.
    for env in [{"LORAD_TOKEN": "0123456789abcdef\r"}, {"LORAD_TOKEN": "p\u00e4sswort-0123456789"}]:
        result = loradctl("adapters", "ls", address=f"127.0.0.1:{free_port()}", env=env)
        assert result.returncode == EXIT_USAGE, (env, result.returncode, result.stderr)
        assert "printable ASCII" in result.stderr, result.stderr


def test_a_ca_cert_that_is_not_pem_is_one_clear_line(tmp_path):
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("hello\n")
    result = loradctl("--ca-cert", str(not_pem), "adapters", "ls",
                      address=f"127.0.0.1:{free_port()}")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr == f"loradctl: --ca-cert {not_pem}: not a PEM certificate bundle " \
                            "(no '-----BEGIN CERTIFICATE-----' line)\n"


def test_unreachable_daemon_fails_with_one_clear_line():
    address = f"127.0.0.1:{free_port()}"
    result = loradctl("train", "ls", address=address, timeout=30)
    assert result.returncode == EXIT_UNAVAILABLE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"loradctl: UNAVAILABLE: cannot reach lorad at {address}"), result.stderr
    # LORAD_ADDRESS is the same setting.
    via_env = loradctl("adapters", "ls", env={"LORAD_ADDRESS": address}, timeout=30)
    assert via_env.returncode == EXIT_UNAVAILABLE and address in via_env.stderr


def assert_succeeded(result, check_result):
    assert result.returncode == 0, result.stderr
    assert check_result(result.stdout), result.stdout


def test_adapters_ls(daemon):
    result = loradctl("adapters", "ls", address=daemon.grpc_address)
    assert_succeeded(
        result, lambda out: out.splitlines()[0].split()[:4] == ["NAME", "VERSION", "STATE", "RANK"])


def test_generate(daemon):
    result = loradctl("generate", "--max-new-tokens", "4", "--temperature", "0", "--seed", "1",
                      "Hello", address=daemon.grpc_address)
    assert_succeeded(result, lambda out: out.endswith("\n") and len(out) > 1)


def test_output_that_cannot_be_written_is_a_failure(daemon, job_file):
    """stdout on a full disk: the listing (or a submitted job's id) was lost, so the exit code
    says so; a stream that cannot be written is cancelled."""
    for args in [("adapters", "ls"),
                 ("generate", "--max-new-tokens", "4", "--temperature", "0", "Hello")]:
        with open("/dev/full", "w") as full:
            result = subprocess.run([str(LORADCTL), "--address", daemon.grpc_address, *args],
                                    stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
        assert result.returncode == 1, (args, result.stderr)
        assert "loradctl: cannot write the output (No space left on device)" in result.stderr
    # A job queued whose id cannot be written: stderr still names it, so it is not sent twice.
    with open("/dev/full", "w") as full:
        result = subprocess.run([str(LORADCTL), "--address", daemon.grpc_address, "train",
                                 "submit", str(job_file)],
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    queued = re.search(r"loradctl: job (job-\S+) was queued, but its id could not be written",
                       result.stderr)
    assert queued, result.stderr
    cancel = loradctl("train", "cancel", queued.group(1), address=daemon.grpc_address)
    assert cancel.returncode == 0, cancel.stderr


def _for_terminal(text):
    """ForTerminal's rule: control characters but a line break and a tab, DEL and C1, escaped."""
    def shown(c):
        if (ord(c) < 0x20 and c not in "\n\t") or c == "\x7f":
            return "\\x%02x" % ord(c)
        return "\\u%04x" % ord(c) if 0x80 <= ord(c) <= 0x9f else c
    return "".join(shown(c) for c in text)


def test_control_characters_of_a_reply_are_shown_not_obeyed_on_a_terminal(daemon):
    """A model may emit ESC, CR, BEL (the tiny one does, sampled hot): on a terminal loradctl
    shows them as \\xNN instead of letting an escape sequence retitle the window, clear the
    screen or hide text; piped, the bytes are kept."""
    import pty
    import tty

    def args(seed):
        return [str(LORADCTL), "--address", daemon.grpc_address, "generate", "--temperature",
                "20", "--max-new-tokens", "120", "--seed", str(seed), "Hello"]

    for seed in range(1, 40):
        piped = subprocess.run(args(seed), capture_output=True, text=True, timeout=60)
        assert piped.returncode == 0, piped.stderr
        if re.search(r"[\x00-\x08\x0b-\x1f\x7f]", piped.stdout):
            break
    else:
        pytest.fail("no seed gave a reply with a control character")
    master, slave = pty.openpty()
    tty.setraw(slave)  # no output processing: the bytes as loradctl wrote them
    proc = subprocess.Popen(args(seed), stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    shown = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO once the child has gone
            break
        if not data:
            break
        shown += data
    os.close(master)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert shown.decode() == _for_terminal(piped.stdout)


def test_chat_reads_piped_stdin(daemon):
    result = loradctl("chat", "--max-new-tokens", "3", "--system", "Be brief.",
                      address=daemon.grpc_address, stdin="Hi\nAnd again?\n")
    # Two user lines, two replies, each ending its own line.
    assert_succeeded(result, lambda out: len(out.splitlines()) >= 2)


# ---- a fake TrainingService, for what the daemon cannot show yet ----------------------------

@pytest.fixture
def fake_training(stubs):
    pb, pb_grpc = stubs.training_pb2, stubs.training_pb2_grpc
    seen = {"metadata": []}

    def events(job_id, outcome):
        yield pb.JobEvent(job_id=job_id, state=pb.JOB_STATE_RUNNING)
        # "early": the trainer counts 4 steps (GetJob's queued estimate says 2) and stops early.
        total = 4 if outcome == "early" else 0
        for step in (1, 2):
            yield pb.JobEvent(job_id=job_id, step=pb.StepMetrics(
                step=step, loss=2.0 / step, learning_rate=1e-4, tokens_per_second=500,
                eta_seconds=2 - step, total_steps=total))
        if outcome == "early":
            yield pb.JobEvent(job_id=job_id, finished=pb.JobSummary(
                steps=2, final_loss=1.0, adapter_name="fake", adapter_version=1,
                adapter_step=1, early_stopped=True))
            yield pb.JobEvent(job_id=job_id, state=pb.JOB_STATE_SUCCEEDED)
        elif outcome == "ok":
            yield pb.JobEvent(job_id=job_id, finished=pb.JobSummary(
                steps=2, final_loss=1.0, adapter_name="fake", adapter_version=1))
            yield pb.JobEvent(job_id=job_id, state=pb.JOB_STATE_SUCCEEDED)
        else:
            yield pb.JobEvent(job_id=job_id, failed="out of memory: needed 3 GiB")
            yield pb.JobEvent(job_id=job_id, state=pb.JOB_STATE_FAILED)

    class Fake(pb_grpc.TrainingServiceServicer):
        def GetJob(self, request, context):
            seen["metadata"].append(dict(context.invocation_metadata()))
            # "-ok": a job with a validation split (a final evaluation after its last step).
            validation = 0.1 if request.job_id.endswith("-ok") else 0.0
            job = pb.Job(id=request.job_id, total_steps=2, state=pb.JOB_STATE_RUNNING,
                         spec=pb.JobSpec(dataset=pb.DatasetSpec(validation_fraction=validation)))
            if request.job_id.endswith("-stale"):  # its last step 130 s ago, an ETA of 64 s
                job.total_steps = 10
                job.last_step.CopyFrom(pb.StepMetrics(step=5, loss=1.5, learning_rate=1e-4,
                                                      tokens_per_second=500, eta_seconds=64))
                job.last_step_time.FromSeconds(int(time.time()) - 130)
                job.last_step_age_seconds = 130  # by the server's clock, whatever the client's
            return job

        def ListJobs(self, request, context):
            seen["metadata"].append(dict(context.invocation_metadata()))
            return pb.ListJobsResponse()

        def WatchJob(self, request, context):
            if request.job_id.endswith("-cut"):  # the daemon goes away mid-stream
                yield pb.JobEvent(job_id=request.job_id, state=pb.JOB_STATE_RUNNING)
                context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            yield from events(request.job_id, request.job_id.split("-")[-1])

    ipb, ipb_grpc = stubs.inference_pb2, stubs.inference_pb2_grpc
    seen["inference"] = []

    class FakeInference(ipb_grpc.InferenceServiceServicer):
        def reply(self, request):
            seen["inference"].append(request)
            yield ipb.GenerateChunk(text="Hel")
            yield ipb.GenerateChunk(text="lo", finish_reason=ipb.FINISH_REASON_LENGTH,
                                    usage=ipb.Usage(prompt_tokens=3, completion_tokens=2))

        def Generate(self, request, context):
            yield from self.reply(request)

        def Chat(self, request, context):
            yield from self.reply(request)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TrainingServiceServicer_to_server(Fake(), server)
    ipb_grpc.add_InferenceServiceServicer_to_server(FakeInference(), server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    server.start()
    yield address, seen
    server.stop(0)


def test_show_says_how_old_a_running_jobs_eta_is(fake_training):
    """`train show` printed a running job's last ETA as it was, however long ago its step ended
    (an evaluation, a full disk, a restart's data preparation since): it says how old it is."""
    address, _ = fake_training
    shown = loradctl("train", "show", "job-1-stale", address=address)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"ETA 1m04s as of 2m10s ago\n", shown.stdout), shown.stdout


def test_token_is_sent_as_bearer_metadata(fake_training):
    address, seen = fake_training
    assert loradctl("train", "ls", "--token", "flag-token-0123456789",
                    address=address).returncode == 0
    assert loradctl("train", "ls", address=address,
                    env={"LORAD_TOKEN": "env-token-0123456789"}).returncode == 0
    assert loradctl("train", "ls", address=address).returncode == 0
    auth = [m.get("authorization") for m in seen["metadata"]]
    assert auth == ["Bearer flag-token-0123456789", "Bearer env-token-0123456789", None]


def test_watch_prints_one_line_per_event_and_exits_by_outcome(fake_training):
    address, _ = fake_training
    ok = loradctl("train", "watch", "job-ok", address=address)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0] == "state running"
    assert lines[1].startswith("step 1/2  loss 2.0000  lr 0.0001  500 tok/s  ETA 1s")
    assert lines[2].startswith("step 2/2  loss 1.0000")
    # ETA 0s, and then the final evaluation: said, rather than sit at ETA 0s.
    assert lines[3] == ("training steps done: the final evaluation and the held-out answers "
                        "follow (not in the ETA)")
    assert lines[4].startswith("succeeded: adapter fake v1, 2 steps, final loss 1.0000")
    assert "\r" not in ok.stdout  # no progress-bar redraws off a terminal

    # The trainer's total in the step events wins over GetJob's estimate (packing: 8/32 and the
    # bar a quarter full at the end); the last line says which step's weights were published
    # and that the job stopped early, as `train show` does.
    early = loradctl("train", "watch", "job-early", address=address)
    assert early.returncode == 0, early.stderr
    lines = early.stdout.splitlines()
    assert lines[1].startswith("step 1/4  ") and lines[2].startswith("step 2/4  "), lines
    assert lines[3].startswith(
        "succeeded: adapter fake v1 (the weights of step 1), 2 steps (stopped early), "), lines

    failed = loradctl("train", "watch", "job-bad", address=address)
    assert failed.returncode == EXIT_JOB_FAILED
    assert "failed: out of memory: needed 3 GiB" in failed.stdout.splitlines()


def test_a_stream_cut_short_says_the_connection_was_lost(fake_training):
    """A watch whose daemon went away mid-stream: lorad was reached, so no hint about TLS."""
    address, _ = fake_training
    cut = loradctl("train", "watch", "job-cut", address=address)
    assert cut.returncode == EXIT_UNAVAILABLE, cut.stderr
    assert cut.stdout.splitlines()[0] == "state running"
    assert f"lost the connection to lorad at {address}" in cut.stderr, cut.stderr
    assert "--ca-cert" not in cut.stderr


def test_help_documents_the_exit_codes():
    result = loradctl("--help")
    assert result.returncode == 0
    assert "24 UNAVAILABLE" in result.stdout
    assert "22 UNIMPLEMENTED" in result.stdout


def test_generate_sends_the_sampling_flags_and_streams_the_reply(fake_training):
    address, seen = fake_training
    result = loradctl("generate", "--adapter", "qa-bot", "--max-new-tokens", "5",
                      "--temperature", "0", "--top-k", "3", "--top-p", "0.9", "--seed", "42",
                      "--stop", "x", "--stop", "y", "--usage", "What is 2+2?", address=address)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello\n"
    assert "3 prompt + 2 completion tokens" in result.stderr and "length" in result.stderr
    request = seen["inference"][0]
    assert request.prompt == "What is 2+2?" and request.adapter == "qa-bot"
    sampling = request.sampling
    assert (sampling.max_new_tokens, sampling.top_k, sampling.seed) == (5, 3, 42)
    assert sampling.HasField("temperature") and sampling.temperature == 0
    assert sampling.top_p == pytest.approx(0.9) and list(sampling.stop) == ["x", "y"]
    assert not sampling.HasField("repetition_penalty")  # unset flags keep the daemon's default


def test_a_stop_flag_takes_one_value_whatever_follows(fake_training):
    """`--stop X PROMPT --flag ...`: the prompt after the stop string stays the prompt (it was
    taken as a second stop string, and the call refused with "PROMPT is required")."""
    address, seen = fake_training
    result = loradctl("generate", "--stop", " a", "Once upon a time", "--max-new-tokens", "5",
                      "--adapter", "qa-bot", address=address)
    assert result.returncode == 0, result.stderr
    request = seen["inference"][0]
    assert request.prompt == "Once upon a time" and request.adapter == "qa-bot"
    assert list(request.sampling.stop) == [" a"] and request.sampling.max_new_tokens == 5


def test_chat_keeps_the_conversation(fake_training):
    address, seen = fake_training
    result = loradctl("chat", "--system", "Be brief.", "--template", "chatml", address=address,
                      stdin="Hi\n\nAnd again?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello\nHello\n"
    first, second = seen["inference"]
    assert second.template == "chatml"
    assert [(m.role, m.content) for m in second.messages] == [
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "And again?")]
    assert len(first.messages) == 2


def test_chat_prefill_starts_every_reply(fake_training, daemon):
    """--prefill: each turn sends the prefill as the assistant's last message to be continued;
    the reply shown and kept is the prefill and what the model wrote after it."""
    address, seen = fake_training
    result = loradctl("chat", "--prefill", "{", address=address, stdin="Hi\nAgain\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "{Hello\n{Hello\n"
    first, second = seen["inference"]
    assert first.continue_final_message and second.continue_final_message
    assert [(m.role, m.content) for m in first.messages] == [("user", "Hi"), ("assistant", "{")]
    assert [(m.role, m.content) for m in second.messages] == [
        ("user", "Hi"), ("assistant", "{Hello"), ("user", "Again"), ("assistant", "{")]
    # The real daemon takes such a turn (and refused the request before the field existed).
    real = loradctl("chat", "--prefill", "Sure,", "--max-new-tokens", "2",
                    address=daemon.grpc_address, stdin="Hi\n")
    assert real.returncode == 0, real.stderr
    assert real.stdout.startswith("Sure,"), real.stdout


def test_text_that_is_not_utf8_is_refused_before_sending(daemon):
    """A Latin-1 terminal or file: loradctl names the field and the byte (exit 2) instead of
    sending a request the server can only refuse as a whole (naming no field); a piped chat ends
    there with the same code (as a refused turn ends it: a script must learn it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LORAD_ADDRESS", "LORAD_TOKEN")}
    base = [str(LORADCTL), "--address", daemon.grpc_address]
    generate = subprocess.run([*base, "generate", "--max-new-tokens", "2", b"caf\xe9"],
                              capture_output=True, env=env, timeout=60)
    assert generate.returncode == 2, generate.stderr
    assert b"prompt: not UTF-8 (byte 0xE9 at offset 3)" in generate.stderr, generate.stderr
    chat = subprocess.run([*base, "chat", "--max-new-tokens", "2"], input=b"caf\xe9\nhello\n",
                          capture_output=True, env=env, timeout=60)
    assert chat.returncode == 2, chat.stderr
    assert b"not UTF-8" in chat.stderr and b"UNIMPLEMENTED" not in chat.stderr, chat.stderr
    assert chat.stdout == b"", chat.stdout  # "hello" was not sent
    load = subprocess.run([*base, "adapters", "load", "x", b"caf\xe9"], capture_output=True,
                          env=env, timeout=60)
    assert load.returncode == 2 and b"path: not UTF-8" in load.stderr, load.stderr


def test_chat_on_a_terminal_goes_on_after_a_failed_turn(daemon):
    """A turn the daemon refuses (here a message longer than the model's context) ends a piped
    chat (a script learns it from the exit code); on a terminal the message is left out of the
    conversation and the next one is answered (the chat ended there)."""
    import pty
    import tty

    lines = "word " * 3000 + "\nhello\n/exit\n"
    piped = loradctl("chat", "--usage", "--max-new-tokens", "2", address=daemon.grpc_address,
                     stdin=lines)
    assert piped.returncode != 0, piped.stderr
    assert "completion tokens" not in piped.stderr, piped.stderr  # "hello" was never sent
    env = {k: v for k, v in os.environ.items() if k not in ("LORAD_ADDRESS", "LORAD_TOKEN")}
    master, slave = pty.openpty()
    tty.setraw(slave)  # no line-length limit, no echo
    proc = subprocess.Popen(
        [str(LORADCTL), "--address", daemon.grpc_address, "chat", "--usage", "--max-new-tokens",
         "2"], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    os.write(master, lines.encode())
    out, err = proc.communicate(timeout=60)
    os.close(master)
    assert proc.returncode == 0, err
    assert b"not added to the conversation" in err, err
    assert err.count(b"completion tokens") == 1, err  # the reply to "hello"
    prompt_tokens = int(re.search(rb"\[(\d+) prompt", err).group(1))
    assert prompt_tokens < 100, err  # "hello" in the template, without the refused message
