#!/usr/bin/env python3
"""Bounded loopback load test for `wgllm serve` (standard library only).

    wgllm serve --model smollm2-135m-instruct --port 8080 --parallel 8 &
    python tools/serve_load.py --base-url http://127.0.0.1:8080 --clients 1,4,8 --requests 20

For each concurrency level, that many clients each send `--requests`
streamed completions one after another (prompt i of a fixed set of 20,
shifted per client): greedy, or with `--temperature T [--top-p P]` seeded
sampling, prompt i with seed `--seed + i`, so each prompt's answer is still
the same whatever else is batched. Reported per level: aggregate generated tokens/s
(completion tokens over the level's wall time), time to first token (p50,
p99), inter-token latency between streamed chunks (p50, p99), the mean
decode batch (from /metrics), and failures. The first level's answers are
the reference: at every other level each prompt's text must be identical
(neither greedy nor seeded output depends on what else is batched), else it
counts as mixed up. With a server that reports it, the bytes decode steps
read back from the device per step are printed too. Exits 1 on any failed or
mixed-up response.
"""

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse

TOPICS = [
    "the moon", "rivers", "a lighthouse", "bread", "winter", "a violin", "bees", "the sea",
    "mountains", "a library", "trains", "coffee", "a garden", "the wind", "clocks", "owls",
    "a city at night", "glass", "deserts", "a bridge",
]
PROMPTS = [f"Write two sentences about {t}." for t in TOPICS]


def pct(xs, p):
    xs = [x for x in xs if x == x]  # a request whose first token was EOS has no TTFT
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def metrics(host, port):
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def one(host, port, model, prompt, max_tokens, chat, sampling):
    """A streamed request: (text, completion tokens, ttft, gaps)."""
    if chat:
        path = "/v1/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    else:
        path = "/v1/completions"
        body = {"model": model, "prompt": prompt}
    body.update({"max_tokens": max_tokens, "stream": True,
                 "stream_options": {"include_usage": True}})
    body.update(sampling)
    c = http.client.HTTPConnection(host, port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    text, times, usage, done = [], [], None, False
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        ev = json.loads(data)
        if "error" in ev:
            raise RuntimeError(f"stream error: {ev['error']}")
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices", []):
            piece = ch["delta"].get("content") if chat else ch.get("text")
            if piece:
                text.append(piece)
                times.append(time.perf_counter())
    c.close()
    if not done or usage is None:
        raise RuntimeError("stream ended without usage and [DONE]")
    ttft = times[0] - t0 if times else float("nan")
    gaps = [b - a for a, b in zip(times, times[1:])]
    return "".join(text), usage["completion_tokens"], ttft, gaps


def level(host, port, model, clients, requests, max_tokens, chat, sampling):
    results, errors, lock = [], [], threading.Lock()

    def client(k):
        for i in range(requests):
            j = (i + k) % len(PROMPTS)
            try:
                r = one(host, port, model, PROMPTS[j], max_tokens, chat, sampling(j))
                with lock:
                    results.append((j,) + r)
            except Exception as e:  # noqa: BLE001 (counted and reported)
                with lock:
                    errors.append(f"client {k} request {i}: {e}")

    m0 = metrics(host, port)
    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    m1 = metrics(host, port)
    steps = m1["wgllm_decode_steps_total"] - m0["wgllm_decode_steps_total"]
    seqs = m1["wgllm_decode_step_sequences_total"] - m0["wgllm_decode_step_sequences_total"]
    rb = "wgllm_decode_readback_bytes_total"
    per_step = (m1[rb] - m0[rb]) / steps if rb in m1 and steps else float("nan")
    hs = "wgllm_decode_host_sampled_total"
    host = m1[hs] - m0[hs] if hs in m1 else float("nan")
    return results, errors, wall, (seqs / steps if steps else 0.0), per_step, host


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="wgllm")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    def sampling(j):
        if a.temperature == 0:
            return {"temperature": 0}
        return {"temperature": a.temperature, "top_p": a.top_p, "seed": a.seed + j}

    u = urllib.parse.urlparse(a.base_url)
    host, port = u.hostname, u.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("loopback only: --base-url must be on 127.0.0.1/localhost")
    reference, bad, rows = {}, 0, []
    for n in [int(x) for x in a.clients.split(",")]:
        res, errs, wall, batch, per_step, host_rows = level(
            host, port, a.model, n, a.requests, a.max_tokens, a.chat, sampling)
        mixed = 0
        for j, text, _, _, _ in res:
            if j in reference and reference[j] != text:
                mixed += 1
            reference.setdefault(j, text)
        toks = sum(r[2] for r in res)
        ttft = [r[3] for r in res]
        gaps = [g for r in res for g in r[4]]
        rows.append((n, len(res), toks, wall, toks / wall, pct(ttft, 50), pct(ttft, 99),
                     pct(gaps, 50) * 1e3, pct(gaps, 99) * 1e3, batch, len(errs), mixed))
        for e in errs[:5]:
            print("  error:", e, file=sys.stderr)
        bad += len(errs) + mixed
        print(f"clients {n}: {len(res)} ok, {len(errs)} failed, {mixed} mixed up; "
              f"{toks} tokens in {wall:.1f} s = {toks / wall:.2f} tok/s; "
              f"TTFT p50 {pct(ttft, 50):.2f} s p99 {pct(ttft, 99):.2f} s; "
              f"inter-token p50 {pct(gaps, 50) * 1e3:.0f} ms p99 {pct(gaps, 99) * 1e3:.0f} ms; "
              f"mean decode batch {batch:.2f}; read back per decode step {per_step:.0f} bytes, "
              f"rows sampled on the host {host_rows:.0f}", flush=True)
    print()
    print("| clients | requests | tokens | wall (s) | tok/s | TTFT p50 (s) | TTFT p99 (s) "
          "| ITL p50 (ms) | ITL p99 (ms) | mean batch | failed | mixed up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %d | %d | %d | %.1f | %.2f | %.2f | %.2f | %.0f | %.0f | %.2f | %d | %d |" % r)
    if len(rows) > 1:
        print(f"\naggregate tok/s, {rows[-1][0]} clients vs {rows[0][0]}: "
              f"{rows[-1][4] / rows[0][4]:.2f}x")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
