#!/usr/bin/env python3
"""PyTorch + PEFT on the same model, batch and trainable sets as `lntune bench`, on one GPU
(or on the CPU for a dry run): the other side of lntune's GPU ratios.

  python3 tools/peer_gpu.py --lntune target/release/lntune --preset llava-7b \
      --methods ln,lora,full --dtype bf16 --batch 1 --seq 2048 --device cuda \
      [--gradient-checkpointing] [--compare bench.jsonl]

The model is LlavaForConditionalGeneration built from the preset's own config.json
(`lntune plan --preset P --print-config`), so both sides train the same shapes; random
weights. Each method runs in its own process (peak memory per method). Trainable sets are
bench's defaults: the vision tower, embeddings and head frozen, the projector trained;
`ln` is PEFT's LN_TUNING on the decoder's norms, `lora` PEFT LoRA (r 8, alpha 16) on the
seven decoder linears, `full` every decoder weight with embeddings and head (no PEFT).
`--dtype bf16`: frozen weights in bf16, trainable tensors and AdamW in f32, forward and
backward under torch.autocast(bf16), as lntune's mixed precision. AdamW lr 1e-4, wd 0.01.
The batch: <bos>, the image tokens, random text; the second half of the text is supervised.
Peak memory: torch.cuda.max_memory_allocated over the whole run, weights included (what
lntune's "GPU held" column is); on the CPU, peak RSS.
Prints one JSON line per method; with --compare, also the table of lntune / PyTorch ratios
from `lntune bench --json` lines of the same configuration.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("ln", "lora", "full")
LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def preset_config(lntune, preset):
    out = subprocess.run([lntune, "plan", "--preset", preset, "--print-config"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def build(cfg_json, method, dtype, device, lora_r, lora_alpha):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig.from_dict(cfg_json)
    cfg._attn_implementation = "sdpa"
    store = torch.bfloat16 if dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(store)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg)
    torch.set_default_dtype(previous)
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "ln":
        from peft import LNTuningConfig, get_peft_model
        model = get_peft_model(model, LNTuningConfig(
            target_modules=["input_layernorm", "post_attention_layernorm", "norm"],
            modules_to_save=["multi_modal_projector"]))
    elif method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
            modules_to_save=["multi_modal_projector"]))
    elif method == "full":
        for name, p in model.named_parameters():
            if "vision_tower" not in name:
                p.requires_grad_(True)
    else:
        raise SystemExit(f"peer_gpu: --methods: unknown method {method} ({', '.join(METHODS)})")
    # master weights of the trained tensors in f32 (mixed precision as in lntune)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, cfg


def synthetic_batch(cfg, batch, seq, device, dtype):
    import torch

    v = cfg.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    if seq < patches + 3:
        raise SystemExit(f"peer_gpu: --seq {seq} leaves no text after 1 bos + {patches} image tokens")
    n_text = seq - 1 - patches
    n_prompt = 1 + patches + n_text // 2
    image = cfg.image_token_id if hasattr(cfg, "image_token_id") else cfg.image_token_index
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, image, (batch, n_text), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long),
                     torch.full((batch, patches), image, dtype=torch.long), text], dim=1)
    labels = ids.clone()
    labels[:, :n_prompt] = -100
    pixels = torch.randn(batch, 3, v.image_size, v.image_size, generator=g)
    store = torch.bfloat16 if dtype == "bf16" else torch.float32
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "pixel_values": pixels.to(device=device, dtype=store),
    }


def run_one(args, method):
    import torch

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg_json = preset_config(args.lntune, args.preset)
    model, cfg = build(cfg_json, method, args.dtype, device, args.lora_r, args.lora_alpha)
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    batch = synthetic_batch(cfg, args.batch, args.seq, device, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    median = statistics.median(times)
    row = {
        "side": "pytorch",
        "method": method,
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "device": args.device,
        "gradient_checkpointing": args.gradient_checkpointing,
        "trainable": sum(p.numel() for p in params),
        "total": total,
        "median_step_s": median,
        "tokens_per_s": args.batch * args.seq / median,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
    }
    if device.type == "cuda":
        row["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["gpu"] = torch.cuda.get_device_name(device)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(row), flush=True)


def compare(rows, lntune_jsonl):
    ours = {}
    for line in open(lntune_jsonl):
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            ours[r["method"]] = r
    print(f"{'method':<8} {'lntune s':>9} {'PyTorch s':>10} {'ratio':>7} "
          f"{'lntune tok/s':>13} {'PyTorch tok/s':>14} {'lntune MiB':>11} {'PyTorch MiB':>12}  (peak GPU allocated, or RSS on the CPU)")
    for r in rows:
        o = ours.get(r["method"])
        if o is None:
            print(f"{r['method']:<8} (no lntune line)")
            continue
        # allocated peaks on a GPU (both include the weights); peak RSS on the CPU
        if "peak_device_mib" in r:
            mem_o, mem_p = o.get("peak_device_mib", float("nan")), r["peak_device_mib"]
        else:
            mem_o, mem_p = o["peak_rss_mib"], r["peak_rss_mib"]
        print(f"{r['method']:<8} {o['median_step_s']:>9.3f} {r['median_step_s']:>10.3f} "
              f"{o['median_step_s'] / r['median_step_s']:>6.2f}x {o['tokens_per_s']:>13.0f} "
              f"{r['tokens_per_s']:>14.0f} {mem_o:>11.0f} {mem_p:>12.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lntune", default="target/release/lntune",
                    help="the lntune binary (reads the preset's config from it)")
    ap.add_argument("--preset", default="llava-7b")
    ap.add_argument("--methods", default="ln,lora,full")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="bf16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute each decoder layer in the backward (HF's checkpointing)")
    ap.add_argument("--compare", metavar="JSONL",
                    help="`lntune bench --json` output of the same configuration: print ratios")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batch < 1 or args.seq < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("peer_gpu: --batch, --seq and --steps must be positive, --warmup not negative")
    if args.one:
        run_one(args, args.one)
        return
    rows = []
    for method in args.methods.split(","):
        method = method.strip()
        if method not in METHODS:
            raise SystemExit(f"peer_gpu: --methods: unknown method {method} ({', '.join(METHODS)})")
        # one process per method: peak memory is the method's own
        cmd = [sys.executable, os.path.abspath(__file__), "--one", method] + \
            [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            tail = out.stderr.strip().splitlines()[-1:] or ["(no message)"]
            print(f"peer_gpu: {method} failed: {tail[0]}", file=sys.stderr)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.compare:
        compare(rows, args.compare)
    if len(rows) != len(args.methods.split(",")):
        sys.exit(1)


if __name__ == "__main__":
    main()
