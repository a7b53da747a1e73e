#!/usr/bin/env python3
"""A small Python client for lorad: the walk-through of the README in a few calls.

    python clients/python/lorad_client.py [--address HOST:PORT] [--token T | --token-file F]
        [--ca-cert PEM [--tls-server-name NAME]] COMMAND ...

--address, --token and --token-file default to $LORAD_ADDRESS, $LORAD_TOKEN and
$LORAD_TOKEN_FILE, as loradctl's do; --ca-cert
(a lorad serving TLS: server.tls_cert_file) trusts that CA bundle, and --tls-server-name is the
name its certificate carries when the address's host is not (a tunnel, an address by IP).

    submit JOB.json        queue a fine-tuning job (a lorad.v1.JobSpec as JSON); prints its id
    watch JOB_ID           print the job's steps (loss, learning rate) until it ends
    chat [--adapter NAME] MESSAGE...
                           one chat turn per MESSAGE, streamed as the tokens come (a reply
                           cut at --max-new-tokens is followed by a note on stderr)
    adapters               list the adapters lorad serves

It needs grpcio and grpcio-tools (the venv `make` builds has both: ~/.cache/lorad/venv). The
Python stubs are compiled from the checkout's proto/ at start into $LORAD_CACHE/py-stubs
(~/.cache/lorad/py-stubs), so
nothing generated is kept in the repository. `LoradClient` is the part to copy into your code.
"""
import argparse
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile

import grpc

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[2] / "proto"


def load_stubs(proto_root=PROTO_ROOT):
    """Compiles proto/lorad/v1/*.proto (once per content) and imports the generated modules."""
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(proto_root.rglob("*.proto"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in protos)).hexdigest()[:16]
    cache = os.environ.get("LORAD_CACHE") or pathlib.Path.home() / ".cache" / "lorad"
    out = pathlib.Path(cache) / "py-stubs" / digest
    if not out.is_dir():
        # Compiled beside it and renamed into place whole: processes starting together (a
        # service's workers) never import another's half-written modules, and a compile killed
        # midway leaves nothing that looks complete.
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=out.parent))
        well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        args = ["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={tmp}",
                f"--grpc_python_out={tmp}", *(str(p.relative_to(proto_root)) for p in protos)]
        try:
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto_root}")
            os.rename(tmp, out)
        except OSError:
            if not out.is_dir():  # else another process put its own there first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.path.insert(0, str(out))
    from lorad.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc
    from lorad.v1 import training_pb2, training_pb2_grpc
    return argparse.Namespace(**{k: v for k, v in locals().items() if k.endswith(("_pb2", "_grpc"))})


class LoradClient:
    """lorad's three services over one channel, with the bearer token (if any) on every call."""

    def __init__(self, address="127.0.0.1:50051", token=None, stubs=None, ca_cert=None,
                 tls_server_name=None):
        """`ca_cert`: a PEM CA bundle (bytes or a path) for a lorad serving TLS;
        `tls_server_name`: the name its certificate carries, where the address's host is not."""
        self.pb = stubs or load_stubs()
        # Replies without gRPC's 4 MB receive limit, as loradctl: GetJob returns a job's inline
        # examples, which lorad accepts up to server.max_request_bytes (a job this client queued
        # could not be read back).
        options = [("grpc.max_receive_message_length", -1)]
        if ca_cert is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            if not isinstance(ca_cert, bytes):
                ca_cert = pathlib.Path(ca_cert).read_bytes()
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self.channel = grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificates=ca_cert), options=options)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.training = self.pb.training_pb2_grpc.TrainingServiceStub(self.channel)
        self.inference = self.pb.inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.adapters = self.pb.adapters_pb2_grpc.AdapterServiceStub(self.channel)

    def submit(self, spec: dict, request_id: str = "") -> str:
        """Queues a job from a JobSpec given as a dict (the proto's JSON form); returns its id.
        With a request_id (e.g. str(uuid.uuid4())), sending it again returns the same job."""
        from google.protobuf import json_format

        request = self.pb.training_pb2.SubmitJobRequest(
            spec=json_format.ParseDict(spec, self.pb.training_pb2.JobSpec()),
            request_id=request_id)
        return self.training.SubmitJob(request, metadata=self.metadata, timeout=600).id

    def state(self, job_id: str) -> str:
        """The job's state's name ("JOB_STATE_RUNNING", ...)."""
        job = self.training.GetJob(self.pb.training_pb2.GetJobRequest(job_id=job_id),
                                   metadata=self.metadata, timeout=30)
        return self.pb.training_pb2.JobState.Name(job.state)

    def watch(self, job_id: str):
        """Yields the job's events (its history first, then live ones) until it ends."""
        request = self.pb.training_pb2.WatchJobRequest(job_id=job_id)
        yield from self.training.WatchJob(request, metadata=self.metadata)

    def chat(self, messages, adapter="", continue_final_message=False, **sampling):
        """Yields the reply's text as it streams; `messages` are (role, content) pairs. With
        continue_final_message the last, an assistant's start of a reply ("{", "Sure,"), is
        continued instead of answered. Once it has ended, self.last_finish
        ("FINISH_REASON_LENGTH": cut at max_new_tokens, or _EOS, _STOP) and self.last_usage
        (prompt and completion tokens) say how."""
        pb = self.pb.inference_pb2
        request = pb.ChatRequest(
            messages=[pb.ChatMessage(role=r, content=c) for r, c in messages], adapter=adapter,
            sampling=pb.SamplingParams(**sampling),
            continue_final_message=continue_final_message)
        self.last_finish, self.last_usage = None, None
        for chunk in self.inference.Chat(request, metadata=self.metadata, timeout=600):
            if chunk.text:
                yield chunk.text
            if chunk.finish_reason:
                self.last_finish = pb.FinishReason.Name(chunk.finish_reason)
                self.last_usage = chunk.usage

    def list_adapters(self):
        request = self.pb.adapters_pb2.ListAdaptersRequest()
        return list(self.adapters.ListAdapters(request, metadata=self.metadata,
                                               timeout=30).adapters)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default=os.environ.get("LORAD_ADDRESS") or "127.0.0.1:50051")
    ap.add_argument("--token", default=None,
                    help="a bearer token from auth.tokens (other local accounts see "
                         "arguments in ps: prefer LORAD_TOKEN or --token-file)")
    ap.add_argument("--token-file", type=pathlib.Path, default=None,
                    help="read the bearer token from this file (its line ending dropped)")
    ap.add_argument("--ca-cert", type=pathlib.Path,
                    help="use TLS, trusting this PEM CA bundle")
    ap.add_argument("--tls-server-name",
                    help="with --ca-cert: the name the server's certificate carries")
    sub = ap.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit")
    submit.add_argument("job_file", type=pathlib.Path)
    submit.add_argument("--request-id", default="",
                        help="your id for this submission: sent again, it returns the same job")
    sub.add_parser("watch").add_argument("job_id")
    chat = sub.add_parser("chat")
    chat.add_argument("--adapter", default="")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("messages", nargs="+")
    sub.add_parser("adapters")
    args = ap.parse_args(argv)
    if args.tls_server_name and not args.ca_cert:
        ap.error("--tls-server-name needs --ca-cert (the name is checked on a TLS connection)")
    from google.protobuf import json_format

    try:
        # The command line wins over the environment; two at one level are refused.
        if not args.token and not args.token_file:
            args.token = os.environ.get("LORAD_TOKEN") or None
            env_file = os.environ.get("LORAD_TOKEN_FILE")
            args.token_file = pathlib.Path(env_file) if env_file else None
        if args.token_file:
            if args.token:
                raise ValueError("give a token (--token or LORAD_TOKEN) or a token file "
                                 "(--token-file or LORAD_TOKEN_FILE), not both")
            # (utf-8-sig: without the byte order mark some editors save first)
            args.token = args.token_file.read_text(encoding="utf-8-sig").strip()
            if not args.token:
                raise ValueError(f"the token file {args.token_file} is empty")
        client = LoradClient(args.address, args.token, ca_cert=args.ca_cert,
                             tls_server_name=args.tls_server_name)
        if args.command == "submit":
            spec = json.loads(args.job_file.read_text())
            if not isinstance(spec, dict):
                raise ValueError(f"{args.job_file}: not a JSON object (a JobSpec's fields)")
            job_id = client.submit(spec, args.request_id)
            print(job_id)
            # Only a request_id sent again returns an ended job: nothing new was queued.
            state = client.state(job_id) if args.request_id else None
            if state in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"):
                print(f"lorad_client: request_id '{args.request_id}' queued job {job_id} before, "
                      f"which has ended ({state}); nothing new was queued: give another "
                      "--request-id to train again", file=sys.stderr)
                return {"JOB_STATE_SUCCEEDED": 0, "JOB_STATE_FAILED": 3}.get(state, 4)
        elif args.command == "watch":
            for event in client.watch(args.job_id):
                if event.HasField("step"):
                    s = event.step
                    print(f"step {s.step}  loss {s.loss:.4f}  lr {s.learning_rate:.3g}", flush=True)
                elif event.HasField("finished"):
                    f = event.finished
                    print(f"succeeded: adapter {f.adapter_name} v{f.adapter_version}, "
                          f"{f.steps} steps, final loss {f.final_loss:.4f}")
                elif event.HasField("warning"):
                    print(f"warning: {event.warning}")
                elif event.HasField("failed"):
                    print(f"failed: {event.failed}")
                    return 1
                elif (event.HasField("state") and event.state ==
                      client.pb.training_pb2.JOB_STATE_CANCELLED):
                    print("cancelled")
                    return 1
        elif args.command == "chat":
            history = []
            for message in args.messages:
                history.append(("user", message))
                reply = ""
                for text in client.chat(history, adapter=args.adapter,
                                        max_new_tokens=args.max_new_tokens):
                    print(text, end="", flush=True)
                    reply += text
                print()
                if client.last_finish == "FINISH_REASON_LENGTH":
                    print(f"lorad_client: the reply was cut at {args.max_new_tokens} tokens "
                          "(--max-new-tokens)", file=sys.stderr)
                history.append(("assistant", reply))
        elif args.command == "adapters":
            for a in client.list_adapters():
                state = ("serving" if a.current else "draining") + \
                    (" (other base)" if a.other_base else "")
                print(f"{a.name}  v{a.version}  rank {a.rank}  {state}")
    except grpc.RpcError as e:
        print(f"lorad_client: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        # Python flushes stdout again at exit; point it at /dev/null so that says nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, ValueError, json_format.Error) as e:
        # A job file unreadable, not JSON, or not a JobSpec's (enums by their full names, as
        # DATASET_FORMAT_QA): one line, not a traceback.
        print(f"lorad_client: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
