"""lorad under a wall clock that steps (an NTP correction, a VM resumed): a call's deadline is kept
on the steady clock, and a job's times never go backwards. An LD_PRELOAD shim shifts
CLOCK_REALTIME (and time(), gettimeofday()) by the seconds written in a file, read every second."""
import subprocess
import time

import grpc

from conftest import start_daemon, stop_daemon

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>
static int (*real_gettime)(clockid_t, struct timespec*);
static long long offset(void) {
  static long long cached; static time_t read_at;
  struct timespec m; real_gettime(CLOCK_MONOTONIC, &m);
  if (read_at == 0 || m.tv_sec != read_at) {
    const char* name = getenv("FAKE_OFFSET_FILE");
    FILE* f = name ? fopen(name, "r") : NULL;
    long long v = 0;
    if (f) { if (fscanf(f, "%lld", &v) != 1) v = 0; fclose(f); }
    cached = v; read_at = m.tv_sec;
  }
  return cached;
}
int clock_gettime(clockid_t id, struct timespec* ts) {
  if (!real_gettime) real_gettime = dlsym(RTLD_NEXT, "clock_gettime");
  int r = real_gettime(id, ts);
  if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) ts->tv_sec += offset();
  return r;
}
int gettimeofday(struct timeval* tv, void* tz) {
  struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts);
  if (tv) { tv->tv_sec = ts.tv_sec; tv->tv_usec = ts.tv_nsec / 1000; }
  return 0;
}
time_t time(time_t* t) {
  struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts);
  if (t) *t = ts.tv_sec;
  return ts.tv_sec;
}
"""


def rpc_codes(daemon, method):
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for family in text_string_to_metric_families(daemon.http_get("/metrics")[1]):
        for s in family.samples:
            if s.name == "lorad_rpc_requests_total" and s.labels.get("method") == method:
                counts[s.labels["code"]] = counts.get(s.labels["code"], 0) + s.value
    return counts


def step_clock(offset_file, seconds):
    offset_file.write_text(str(seconds))
    time.sleep(1.5)  # the shim reads the file again every second


def test_clock_steps_neither_mislabel_cancels_nor_end_jobs_before_they_start(tmp_path, stubs,
                                                                           monkeypatch):
    offset = tmp_path / "offset"
    offset.write_text("0")
    (tmp_path / "shim.c").write_text(SHIM)
    shim = tmp_path / "shim.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "shim.c"), "-ldl"],
                   check=True)
    monkeypatch.setenv("LD_PRELOAD", str(shim))
    monkeypatch.setenv("FAKE_OFFSET_FILE", str(offset))
    d = start_daemon(tmp_path / "daemon")
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.delenv("FAKE_OFFSET_FILE")
    tpb = stubs.training_pb2
    try:
        with grpc.insecure_channel(d.grpc_address) as channel:
            train = stubs.training_pb2_grpc.TrainingServiceStub(channel)
            examples = [tpb.InlineExample(json=f'{{"text": "example {i} of a few words"}}')
                        for i in range(8)]
            job = train.SubmitJob(tpb.SubmitJobRequest(spec=tpb.JobSpec(
                adapter_name="clock", dataset=tpb.DatasetSpec(inline_examples=examples),
                training=tpb.TrainingSpec(max_steps=100000, micro_batch_size=1))), timeout=60)
            # A watch with a minute's deadline that its client cancels after the wall clock
            # jumped two minutes ahead: cancelled, not out of time (it was counted
            # DEADLINE_EXCEEDED, the deadline being kept on the wall clock).
            before = rpc_codes(d, "lorad.v1.TrainingService/WatchJob")
            watch = train.WatchJob(tpb.WatchJobRequest(job_id=job.id), timeout=60)
            next(watch)
            step_clock(offset, 120)
            watch.cancel()
            # Then two hours back while the job trains: it ended before it started.
            step_clock(offset, -7200)
            running = train.GetJob(tpb.GetJobRequest(job_id=job.id), timeout=10)
            assert running.state == tpb.JOB_STATE_RUNNING, running.error
            deadline = time.time() + 120  # a few steps after the step back, then a cancel
            while (time.time() < deadline and train.GetJob(tpb.GetJobRequest(
                    job_id=job.id), timeout=10).last_step.step < running.last_step.step + 3):
                time.sleep(0.2)
            train.CancelJob(tpb.CancelJobRequest(job_id=job.id), timeout=30)
            got = train.GetJob(tpb.GetJobRequest(job_id=job.id), timeout=10)
            assert got.state == tpb.JOB_STATE_CANCELLED, got.error
            assert got.last_step.step >= running.last_step.step + 3
            created, started, finished = (t.ToMilliseconds() for t in
                                          (got.created, got.started, got.finished))
            assert created <= started <= finished, (created, started, finished)
            # When its last step was reported (loradctl says how old the ETA is from it).
            assert got.HasField("last_step_time") and got.last_step_age_seconds >= 0
            assert started <= got.last_step_time.ToMilliseconds() <= finished
            times = [e.time.ToMilliseconds() for e in
                     train.WatchJob(tpb.WatchJobRequest(job_id=job.id), timeout=60)]
            assert times == sorted(times), times
        time.sleep(1.0)  # the server's side of the cancelled watch ends after the client's
        counted = rpc_codes(d, "lorad.v1.TrainingService/WatchJob")
        rise = {code: n - before.get(code, 0) for code, n in counted.items()
                if n != before.get(code, 0)}
        assert rise.get("CANCELLED") == 1 and "DEADLINE_EXCEEDED" not in rise, rise
    finally:
        offset.write_text("0")
        stop_daemon(d)
