#!/usr/bin/env python3
"""Load on a running `lntune serve` (Python standard library only): at each concurrency,
that many clients send chat requests with an image back to back for --duration seconds;
prints requests/s, completion tokens/s, p50/p99 latency and errors per level.

    python3 tools/serve_bench.py --port 8080 --model ln --image demo-out/data/images/test_00000.png
"""

import argparse
import base64
import http.client
import json
import statistics
import threading
import time


def one(port, body, key):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body, headers)
    r = c.getresponse()
    data = r.read()
    dt = time.perf_counter() - t0
    c.close()
    if r.status != 200:
        return dt, None
    return dt, json.loads(data)["usage"]["completion_tokens"]


def level(port, body, key, clients, duration):
    lat, tokens, errors = [], [0], [0]
    lock = threading.Lock()
    end = time.perf_counter() + duration

    def client():
        while time.perf_counter() < end:
            dt, n = one(port, body, key)
            with lock:
                if n is None:
                    errors[0] += 1
                else:
                    lat.append(dt)
                    tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
    return {
        "concurrency": clients,
        "requests": len(lat),
        "errors": errors[0],
        "requests_per_s": len(lat) / wall,
        "tokens_per_s": tokens[0] / wall,
        "p50_s": statistics.median(lat) if lat else float("nan"),
        "p99_s": p99,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", default="Describe the image in detail.")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with open(a.image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    body = json.dumps({
        "model": a.model, "temperature": 0, "max_tokens": a.max_tokens,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": a.prompt},
            {"type": "image_url", "image_url": {"url": url}}]}],
    })
    rows = [level(a.port, body, a.api_key, int(c), a.duration) for c in a.concurrency.split(",")]
    if a.json:
        print(json.dumps(rows))
        return
    print("| concurrency | requests | errors | requests/s | tokens/s | p50 latency | p99 latency |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['p50_s']:.2f} s | {r['p99_s']:.2f} s |")


if __name__ == "__main__":
    main()
