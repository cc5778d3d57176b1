#!/usr/bin/env bash
# The GPU checks of lntune in one run (issue: GPU training), meant for a machine with one
# NVIDIA card and no Rust toolchain: the binary is built elsewhere with `--features cuda`
# and carried. Dry-run it on the CPU first with the CPU build and a small preset:
#
#   tools/device-check.sh --lntune target/release/lntune --device cpu --preset small --out /tmp/dc
#   tools/device-check.sh --lntune .device/lntune --device cuda --preset llava-7b --out "$OUT"
#
# What it does, each step's output under --out (summary.txt holds the verdicts):
#   1. `check` on every fixture under tests/fixtures, f32 and bf16, on --device (f32 within
#      check's 1e-4 of the transformers references, as the CPU is; bf16 within its stated
#      tolerance);
#   2. a 20-step LoRA training run on the tiny-llava fixture on --device and on the CPU:
#      the loss curves must agree within 1e-3 at every step;
#   3. `bench --preset P --method ln,lora,full --dtype bf16 --batch 1 --seq S`: step time,
#      tokens/s, peak memory held and `plan`'s estimate of it, per method (bench.txt);
#   4. where --python (default python3) has torch, transformers and peft:
#      tools/peer_gpu.py on the same configuration, and the lntune / PyTorch ratios
#      (peer.txt, peer-checkpointing.txt).
# Exit status: 0 when every check passed (the benchmarks have no verdict, only numbers).
set -uo pipefail
cd "$(dirname "$0")/.."

LNTUNE=target/release/lntune
DEVICE=cuda
PRESET=llava-7b
SEQ=2048
OUT=target/device-check
PYTHON=python3
while [ $# -gt 0 ]; do
  case "$1" in
    --lntune) LNTUNE=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --preset) PRESET=$2; shift 2 ;;
    --seq) SEQ=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    *) echo "device-check: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
# dry run on the CPU: the "device" side takes the composed tensor-op paths that CUDA takes
# (no fused CPU kernel), so that step 2 compares two different code paths here too
DEV_ENV=()
[ "$DEVICE" = cpu ] && DEV_ENV=(LNTUNE_COMPOSED_OPS=1)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
say() { echo "$*" | tee -a "$SUMMARY"; }
verdict() { # name, exit status
  if [ "$2" -eq 0 ]; then say "PASS $1"; else say "FAIL $1 (exit $2)"; FAILED=1; fi
}

# CUDA's runtime libraries: a GPU machine with PyTorch has them in the nvidia-* wheels'
# lib folders; LNTUNE_CUDA_LIBS names others (tools/cuda-toolchain.sh writes it).
if [ "$DEVICE" != cpu ]; then
  libs=${LNTUNE_CUDA_LIBS:-}
  if [ -z "$libs" ]; then
    libs=$(python3 - <<'EOF' 2>/dev/null
import glob, os
import nvidia
dirs = set()
for root in nvidia.__path__:
    for so in glob.glob(os.path.join(root, "**", "lib", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(so))
print(":".join(sorted(dirs)))
EOF
)
  fi
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
say "lntune: $LNTUNE on $DEVICE, preset $PRESET, seq $SEQ ($(date -u +%FT%TZ))"
"$LNTUNE" --version >/dev/null 2>&1 || { say "FAIL the binary does not start (missing libraries?)"; ldd "$LNTUNE" | grep "not found" | tee -a "$SUMMARY"; exit 1; }

# 1. check on every fixture
F=tests/fixtures
checks=(
  "tiny-llava $F/tiny-llava $F/tiny-llava/ref/batch.safetensors $F/tiny-llava/ref/expected.safetensors"
  "tiny-dinov2-llama $F/tiny-dinov2-llama $F/tiny-dinov2-llama/batch.safetensors $F/tiny-dinov2-llama/expected.safetensors"
)
for v in "$F"/variants/*/; do
  v=${v%/}
  checks+=("$(basename "$v") $v $v/batch.safetensors $v/expected.safetensors")
done
for c in "${checks[@]}"; do
  read -r name model batch expected <<<"$c"
  for dtype in f32 bf16; do
    env "${DEV_ENV[@]}" "$LNTUNE" check --model "$model" --batch "$batch" --expected "$expected" \
      --dtype "$dtype" --device "$DEVICE" > "$OUT/check-$name-$dtype.txt" 2>&1
    verdict "check $name $dtype" $?
  done
done

# 2. the same 20 training steps on the device and on the CPU: tiny-llava with the tests'
# tokenizer, on generated `shapes` data at its tower's 56 px
DATA=$OUT/train-data
MODEL=$OUT/train-model
rm -rf "$DATA" "$MODEL" "$OUT/train-cpu" "$OUT/train-dev"
mkdir -p "$MODEL"
cp "$F"/tiny-llava/*.json "$F"/tiny-llava/*.safetensors "$F"/tiny-llava-tokenizer/*.json "$MODEL"/
"$LNTUNE" data shapes --out "$DATA" --train 16 --test 4 --size 56 > "$OUT/data.txt" 2>&1
verdict "training data" $?
for side in cpu dev; do
  dev=$DEVICE; envs=("${DEV_ENV[@]}")
  [ "$side" = cpu ] && dev=cpu && envs=()
  env "${envs[@]}" "$LNTUNE" train --model "$MODEL" --data "$DATA/conversation_train.json" \
    --images "$DATA/images" --out "$OUT/train-$side" --method lora --steps 20 --batch 2 \
    --template chatml --lr 1e-3 --device "$dev" --quiet > "$OUT/train-$side.txt" 2>&1
  verdict "train 20 steps on $dev ${envs[*]}" $?
done
python3 - "$OUT/train-cpu/metrics.jsonl" "$OUT/train-dev/metrics.jsonl" > "$OUT/train-compare.txt" 2>&1 <<'EOF'
import json, sys
rows = [[json.loads(l) for l in open(p) if '"loss"' in l] for p in sys.argv[1:]]
a, b = ([r["loss"] for r in rs if "loss" in r] for rs in rows)
assert len(a) == len(b) == 20, (len(a), len(b))
worst = max(abs(x - y) for x, y in zip(a, b))
print(f"largest loss difference over 20 steps: {worst:.3g}")
sys.exit(0 if worst <= 1e-3 else 1)
EOF
rc=$?
verdict "loss curves within 1e-3 ($(tail -1 "$OUT/train-compare.txt"))" $rc

# 3. the paper-scale benchmark (JSON lines in bench.jsonl, a table in the summary)
"$LNTUNE" bench --preset "$PRESET" --method ln,lora,full --dtype bf16 --batch 1 --seq "$SEQ" \
  --steps 3 --warmup 1 --device "$DEVICE" --json > "$OUT/bench.jsonl" 2> "$OUT/bench-stderr.txt"
verdict "bench $PRESET" $?
python3 - "$OUT/bench.jsonl" <<'EOF' | tee -a "$SUMMARY"
import json, sys
print(f"{'method':<8} {'trainable':>13} {'median s':>9} {'tokens/s':>9} {'held MiB':>9} {'planned':>9} {'peak RSS':>9}")
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        held = r.get("peak_device_mib") or r.get("peak_heap_mib") or float("nan")
        print(f"{r['method']:<8} {r['trainable']:>13,} {r['median_step_s']:>9.3f} {r['tokens_per_s']:>9.0f} "
              f"{held:>9.0f} {r['planned_peak_mib']:>9.0f} {r['peak_rss_mib']:>9.0f}")
EOF

# 4. PyTorch + PEFT on the same card, model, batch and trainable sets (tools/peer_gpu.py),
# where the machine's python has torch, transformers and peft: eager, then ln with HF's
# gradient checkpointing (the policy lntune's `auto` picks at this size)
if "$PYTHON" -c "import torch, transformers, peft" 2>/dev/null; then
  PEER=(tools/peer_gpu.py --lntune "$LNTUNE" --preset "$PRESET" --dtype bf16 --batch 1
    --seq "$SEQ" --steps 3 --warmup 1 --device "$DEVICE")
  [ "$DEVICE" = cpu ] && PEER+=(--threads 2)
  "$PYTHON" "${PEER[@]}" --methods ln,lora,full --compare "$OUT/bench.jsonl" > "$OUT/peer.txt" 2>&1
  verdict "PyTorch + PEFT eager (some methods may not fit: see peer.txt)" $?
  "$PYTHON" "${PEER[@]}" --methods ln --gradient-checkpointing --compare "$OUT/bench.jsonl" \
    > "$OUT/peer-checkpointing.txt" 2>&1
  verdict "PyTorch + PEFT ln, gradient checkpointing" $?
  grep -v '^{' "$OUT/peer.txt" | tee -a "$SUMMARY"
  grep -v '^{' "$OUT/peer-checkpointing.txt" | tee -a "$SUMMARY"
else
  say "SKIP PyTorch + PEFT: $PYTHON has no torch, transformers and peft"
fi
exit $FAILED
