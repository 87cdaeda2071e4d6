"""HTTP load against a served model, and the latency statistics every report of it uses.

The benchmarks (bench/serving.py) and the serving tests (tests/test_serving.py) load a
TorchServe the same way and summarize latencies the same way, with this module:

    from serving.loadtest import run_load
    row = run_load("http://127.0.0.1:8080/predictions/base_cnn", payloads, concurrency=16, n_requests=240)
    row["req_s"], row["p50_ms"], row["p99_ms"], row["errors"]

The load generator is Python threads, one keep-alive HTTP/1.1 connection each
(http.client: the lightest client of the standard library, so the generator takes as little
as it can of CPUs it may share with the server), POSTing the bytes of `payloads`
round-robin. Only the standard library: importing it loads no framework.
"""
import collections
import http.client
import itertools
import threading
import time
from urllib.parse import urlsplit

# One request: when it was sent and answered (time.monotonic(), the clock callers compare with),
# the HTTP status (or the exception's name when there was no answer), the body, and which request.
Result = collections.namedtuple("Result", "start end status body index")


def percentile(values, q):
    """The q-th percentile (q in 0..100) of a non-empty sequence, linearly interpolated; None when empty.

    Linear interpolation between the two closest ranks is numpy.percentile's default, so every
    figure can be recomputed with numpy from the same samples, and it moves smoothly with the
    data. Nearest-rank (always an observed value) jumps by whole samples: with the 40 requests of
    a 1-client cell its p99 is simply the slowest request.
    """
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(seconds):
    """{"p50_ms", "p99_ms", "mean_ms"} of durations in seconds, in milliseconds (None when there are none)."""
    if not seconds:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    return {"p50_ms": round(percentile(seconds, 50) * 1000, 2),
            "p99_ms": round(percentile(seconds, 99) * 1000, 2),
            "mean_ms": round(sum(seconds) / len(seconds) * 1000, 2)}


def send_requests(url, payloads, total, concurrency, max_seconds=None, timeout=120, on_done=None, headers=None):
    """POST `total` requests to `url` (payloads round-robin) from `concurrency` client threads.

    Returns [Result] in the order the answers came. No request is sent after `max_seconds`
    (requests in flight then are still awaited, each at most `timeout` seconds). `on_done(n)`,
    when given, is called by a client thread after each answer, with the number answered so
    far. A client whose request fails without an answer (a dropped connection) reconnects.
    `headers`: those of every request, a dict; or one dict per payload (a list as long as `payloads`:
    payloads[i] goes with headers[i], e.g. a length header that differs per body); None (the default):
    Content-Type: application/octet-stream, TorchServe's raw bytes.
    """
    parts = urlsplit(url)
    path = parts.path + ("?" + parts.query if parts.query else "")
    if headers is None:
        headers = {"Content-Type": "application/octet-stream"}
    if isinstance(headers, dict):
        headers = [headers]
    elif len(headers) != len(payloads):
        raise ValueError("headers: one dict for every request, or one per payload (%d), not %d"
                         % (len(payloads), len(headers)))
    counter, lock, results = itertools.count(), threading.Lock(), []
    deadline = time.monotonic() + max_seconds if max_seconds is not None else None

    def client():
        conn = None
        try:
            while True:
                i = next(counter)  # itertools.count is atomic under the GIL
                if i >= total or (deadline is not None and time.monotonic() > deadline):
                    return
                start = time.monotonic()
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
                    conn.request("POST", path, body=payloads[i % len(payloads)], headers=headers[i % len(headers)])
                    response = conn.getresponse()
                    status, body = response.status, response.read().decode("utf-8", "replace")
                except (OSError, http.client.HTTPException) as exc:
                    status, body = type(exc).__name__, str(exc)
                    if conn is not None:
                        conn.close()
                    conn = None
                with lock:
                    results.append(Result(start, time.monotonic(), status, body, i))
                    done = len(results)
                if on_done is not None:
                    on_done(done)
        finally:
            if conn is not None:
                conn.close()

    # daemon: an interrupted caller (Ctrl-C) is not held up by clients waiting for answers
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_load(url, payloads, concurrency, n_requests, max_seconds=60, warmup=None, timeout=120, headers=None):
    """One measured cell: a few untimed warm-up requests, then `n_requests` at `concurrency`; `headers` as
    send_requests takes them.

    Returns {"concurrency", "requests", "ok", "errors", "seconds", "req_s" (answered 200 per
    second of wall time), "p50_ms", "p99_ms", "mean_ms" (of the 200s), "first_error" (when any),
    "sample_answer" (the first 200's body)}.
    """
    send_requests(url, payloads, warmup if warmup is not None else max(8, 2 * concurrency), concurrency,
                  max_seconds, timeout, headers=headers)
    start = time.monotonic()
    results = send_requests(url, payloads, n_requests, concurrency, max_seconds, timeout, headers=headers)
    wall = time.monotonic() - start
    ok = [r for r in results if r.status == 200]
    errors = [r for r in results if r.status != 200]
    row = {"concurrency": concurrency, "requests": len(results), "ok": len(ok), "errors": len(errors),
           "seconds": round(wall, 2), "req_s": len(ok) / wall if wall > 0 else None}
    row.update(latency_summary([r.end - r.start for r in ok]))
    if errors:
        row["first_error"] = {"status": errors[0].status, "body": errors[0].body[:200]}
    row["sample_answer"] = ok[0].body[:200] if ok else None
    return row
