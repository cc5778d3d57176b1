#!/usr/bin/env python3
"""lntune's training step against the PyTorch peer harness, both measured here, in one go.

For each pass, dtype and method, runs `lntune bench --json` and the peer's `bench.py`
back to back (the order alternating between passes), then prints the median over the
passes of each side's median step, their ratio (lntune / PyTorch), each side's peak RSS and
the CPU share other processes took while each side ran. The machine is shared and one
step moves by up to 40% between runs, so only ratios of alternated runs mean anything.

    python3 tools/compare_peer.py --python PEER_VENV/bin/python [--peer ../shared/peer/bench.py]
        [--lntune target/release/lntune] [--methods ln,lora,full] [--dtypes f32,bf16]
        [--passes 3] [--threads 2] [--json-out FILE]

Standard library only; the peer's Python needs torch, transformers and peft.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys


def run_lntune(a, method, dtype):
    cmd = [a.lntune, "--threads", str(a.threads), "bench", "--preset", "small", "--method",
           method, "--batch", "2", "--seq", "256", "--steps", str(a.steps), "--warmup", "2",
           "--dtype", dtype, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"lntune bench failed: {out.stderr.strip().splitlines()[-1:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return dict(step=r["median_step_s"], rss=r["peak_rss_mib"], other=r["other_cpu_share"])


def run_peer(a, method, dtype):
    cmd = [a.python, a.peer, "--method", method, "--model", "small", "--batch", "2", "--seq",
           "256", "--steps", str(a.steps), "--threads", str(a.threads), "--dtype", dtype]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench.py failed: {out.stderr.strip().splitlines()[-3:]}")
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    r = json.loads(line)
    return dict(step=r["median_step_s"], rss=r["peak_rss_mb"], other=r["other_procs_cpu_frac"])


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", required=True, help="a Python with torch, transformers, peft")
    ap.add_argument("--peer", default=os.path.join(here, "..", "..", "shared", "peer", "bench.py"))
    ap.add_argument("--lntune", default=os.path.join(here, "..", "target", "release", "lntune"))
    ap.add_argument("--methods", default="ln,lora,full")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", default=None, help="append every measurement as a JSON line")
    a = ap.parse_args()
    for f, what in [(a.peer, "--peer"), (a.lntune, "--lntune"), (a.python, "--python")]:
        if not os.path.isfile(f):
            sys.exit(f"{what}: {f}: no such file")
    methods, dtypes = a.methods.split(","), a.dtypes.split(",")
    runs = {}
    for p in range(a.passes):
        for dtype in dtypes:
            for method in methods:
                sides = [("lntune", run_lntune), ("pytorch", run_peer)]
                if p % 2 == 1:
                    sides.reverse()
                for side, fn in sides:
                    r = fn(a, method.replace("-", "_") if side == "pytorch" else method, dtype)
                    runs.setdefault((dtype, method, side), []).append(r)
                    print(f"pass {p + 1} {dtype} {method:<5} {side:<7} step {r['step']:.3f} s, "
                          f"peak {r['rss']:.0f} MiB, other CPU {100 * r['other']:.0f}%",
                          file=sys.stderr, flush=True)
                    if a.json_out:
                        with open(a.json_out, "a") as f:
                            f.write(json.dumps(dict(pass_=p + 1, dtype=dtype, method=method,
                                                    side=side, **r)) + "\n")
    print(f"| method, dtype | lntune step | PyTorch step | ratio | lntune RSS | PyTorch RSS "
          f"| RSS ratio | other CPU (max) |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for method in methods:
            l, t = runs[(dtype, method, "lntune")], runs[(dtype, method, "pytorch")]
            ls, ts = statistics.median(x["step"] for x in l), statistics.median(x["step"] for x in t)
            lr, tr = max(x["rss"] for x in l), max(x["rss"] for x in t)
            other = max(x["other"] for x in l + t)
            print(f"| {method}, {dtype} | {ls:.3f} s | {ts:.3f} s | {ls / ts:.2f}x | {lr:.0f} MiB "
                  f"| {tr:.0f} MiB | {lr / tr:.2f} | {100 * other:.0f}% |")


if __name__ == "__main__":
    main()
