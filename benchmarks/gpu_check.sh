#!/usr/bin/env bash
# One-shot GPU check for a session with one H100/H200 (~8 minutes of machine time, start included).
#
#   Here (dev machine, has PyPI):   bash benchmarks/gpu_check.sh --prepare-wheels
#       downloads/builds the wheels the device image lacks into .carry/wheels (git-ignored, ~7 MB):
#       deepspeed 0.19.8 (built as a pure-Python wheel; ops JIT-build on first use), its pydantic/hjson
#       deps, webdataset (for the data reader's GPU test).
#   On the device (repo root):       bash benchmarks/gpu_check.sh
#       with the device tool's `carry: [".carry/wheels"]`. Installs those wheels into /tmp/site, then runs,
#       most important first, each part in its own process with its own timeout, until the budget
#       (GPU_CHECK_BUDGET_S, default 420 s) is spent:
#         A  images/s of the real training loop (Trainer.train_step), DCGAN 64/128/256 (the paper's cat
#            presets' widths), fp32 vs bf16 x channels_last off/on
#         B  ddp(1) vs deepspeed(1) vs single, DCGAN-64 bf16 (benchmarks/step_time_dist.py)
#         C  GPU-only correctness checks: fp16 GradScaler + R1 penalty; DDP with BatchNorm and
#            per-forward buffer broadcast (the CUDA in-place pitfall); SyncBatchNorm; DeepSpeed ZeRO-2
#            bf16 + R1 penalty; the test suite's `-m gpu` tests
#         D  torch.compile on/off at 64 (then 128 if time is left), bf16 + channels_last
#       Prints a markdown table; with $OUT set also writes $OUT/gpu_results.md and $OUT/gpu_check.log.
#   GPU_CHECK_PARTS=BC runs only those parts (default ABCDE; E = our loop vs a plain loop, benchmarks/step_time.py).
#   Plumbing dry run anywhere: GPU_CHECK_DEVICE=cpu GPU_CHECK_BUDGET_S=200 bash benchmarks/gpu_check.sh
#       (CUDA-only checks then fail as rows, which is the point: every failure is a row, never the end).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.carry/wheels}

if [[ "${1:-}" == "--prepare-wheels" ]]; then
  set -e
  mkdir -p "$WHEELS"
  plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d "$WHEELS" \
    hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 webdataset==1.0.2 braceexpand==0.1.7
  # DeepSpeed ships only an sdist; without DS_BUILD_OPS it builds a pure-Python wheel.
  python3 -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8
  ls -la "$WHEELS"
  exit 0
fi

BUDGET=${GPU_CHECK_BUDGET_S:-420}
PARTS=${GPU_CHECK_PARTS:-ABCDE}
START=$(date +%s)
RES=$(mktemp)
ENVF=$(mktemp)
LOG=${OUT:+$OUT/gpu_check.log}
LOG=${LOG:-$(mktemp)}
DEV=${GPU_CHECK_DEVICE:-cuda}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 RGAN_DEV="$DEV"
[[ "$DEV" == cuda ]] && export DS_ACCELERATOR=cuda
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
row() { echo "| $1 | $2 | $3 |" >> "$RES"; }
# part NAME TIMEOUT CMD...: run one part with its own timeout; its stdout rows (lines starting "| ")
# go to the table, everything goes to the log; a failure or timeout becomes a row, never the end.
part() {
  local name=$1 t=$2; shift 2
  [[ "$PARTS" == *"${name:0:1}"* ]] || return 0
  local budget_left; budget_left=$(left)
  if (( budget_left < 20 )); then row "$name" "skipped" "budget spent"; return; fi
  (( t > budget_left )) && t=$budget_left
  echo "== $name (timeout ${t}s, $(left)s left)" | tee -a "$LOG"
  local out; out=$(mktemp)
  timeout --kill-after=10 "$t" "$@" > "$out" 2>&1
  local rc=$?
  cat "$out" >> "$LOG"
  grep '^| ' "$out" >> "$RES" || true
  if (( rc == 124 || rc == 137 )); then row "$name" "TIMEOUT after ${t}s" "see log";
  elif (( rc != 0 )); then row "$name" "FAILED (exit $rc)" "$(grep -v '^|' "$out" | grep -iE 'error|exception' | tail -1 | cut -c1-150 | tr '|' '/')"; fi
}

{
  echo "## GPU check ($(date -u +%F' '%H:%M) UTC)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
} | tee -a "$LOG" "$ENVF"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl >> "$LOG" 2>&1 && export PYTHONPATH="/tmp/site:$PYTHONPATH" \
    || echo "wheel install failed (see log)" | tee -a "$LOG"
else
  echo "no wheels in $WHEELS: deepspeed parts will fail (run --prepare-wheels here, carry $WHEELS)" | tee -a "$LOG"
fi
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$LOG" "$ENVF"
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$LOG" "$ENVF"

# ---- A: loop throughput --------------------------------------------------------------------------
THROUGHPUT_PY='
import os, sys, time, tempfile, torch
from rgan_dist.config import load_config
dev = os.environ["RGAN_DEV"]
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
from rgan_dist.engine.loop import Trainer
res, width, batch, steps = (int(x) for x in sys.argv[1:5])
torch.backends.cudnn.benchmark = True
for precision, cl, comp, pen in [tuple((x + ":none").split(":")[:4]) for x in sys.argv[5:]]:
    label = f"DCGAN-{res} w{width} b{batch} {precision} channels_last={cl} compile={comp}" + (f" penalty={pen}" if pen != "none" else "")
    try:
        cfg = load_config(None, ["model.arch=dcgan", f"model.resolution={res}", f"model.width={width}",
            "model.channels=3", "model.z_dim=128", "loss.name=rasgan", f"train.batch_size={batch}",
            f"loss.penalty={pen}", "model.d_batch_norm=" + ("true" if pen == "none" else "false"),
            f"train.precision={precision}", f"train.channels_last={cl}", f"train.compile={comp}",
            "train.progress=false", "train.sample_every=0", "checkpoint.every=0", "tracking.enabled=false",
            f"run.device={dev}", f"run.out_dir={tempfile.mkdtemp()}"])
        t = Trainer(cfg)
        t0 = time.perf_counter()
        for _ in range(5):
            t.train_step()
        sync(); warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            t.train_step()
        sync(); dt = time.perf_counter() - t0
        ips = 2 * batch * steps / dt  # one D batch + one fresh G batch of reals per outer step
        mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
        print(f"| A throughput | {label} | {ips:.0f} img/s, {1000*dt/steps:.1f} ms/step, warm-up {warm:.1f}s, peak {mem:.1f} GiB |", flush=True)
        t.strategy.close(); del t
        if dev == "cuda":
            torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    except Exception as e:
        print(f"| A throughput | {label} | FAILED: {type(e).__name__}: {str(e)[:120]} |", flush=True)
'
MATRIX="fp32:false:false fp32:true:false bf16:false:false bf16:true:false"

# ---- B: ddp(1) vs deepspeed(1) ---------------------------------------------------------------------
B_PY='
import os, subprocess, sys
cmd = [sys.executable, "benchmarks/step_time_dist.py", "--device", os.environ["RGAN_DEV"], "--nproc", "1", "--threads", "4",
       "--resolution", "64", "--width", "64", "--batch", "64", "--steps", "40", "--repeats", "1",
       "--strategies", "single,ddp,deepspeed", "--zero", sys.argv[1]]
p = subprocess.run(cmd, capture_output=True, text=True)
print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
for line in p.stdout.splitlines():
    if " median " in line:
        name, value = line.split()[0], line.split("median")[1].split("runs")[0].strip()
        print(f"| B ddp(1) vs deepspeed(1), DCGAN-64 b64 fp32, ZeRO-{sys.argv[1]} | {name} | {value} |")
    if line.startswith(("ddp/", "deepspeed/")):
        rest = " ".join(line.split()[1:])
        print(f"| B ratio ZeRO-{sys.argv[1]} | {line.split()[0]} | {rest} |")
sys.exit(p.returncode)
'

# ---- C: GPU-only correctness checks ----------------------------------------------------------------
TRAIN=(-m launcher train --config configs/demo.yaml model.resolution=64 model.width=32 model.channels=3
       train.batch_size=32 train.progress=false tracking.enabled=false train.sample_every=0 train.log_every=5
       run.device=$DEV)
TR=(-m torch.distributed.run --standalone --nproc_per_node=1)
check() {  # check NAME CMD...: one row, ok with the last metrics line, or the error
  local name=$1; shift
  local d; d=$(mktemp -d)
  if "$@" run.out_dir="$d" > "$d/out.txt" 2>&1; then
    local last; last=$(tail -1 "$d/metrics.jsonl" 2>/dev/null | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print(f\"step {r['step']}: d_loss {r['d_loss']:.3f} g_loss {r['g_loss']:.3f} bad_steps {r.get('bad_steps', 0):.0f}\")" 2>/dev/null)
    echo "| C $name | ok | ${last:-no metrics} |"
  else
    echo "| C $name | FAILED | $(grep -iE 'error|exception' "$d/out.txt" | tail -1 | cut -c1-160 | tr '|' '/') |"
    tail -30 "$d/out.txt" >&2
  fi
}
C_SH="$(declare -f check); TRAIN=(${TRAIN[*]}); TR=(${TR[*]});"
GPU_TESTS_PY='
import subprocess, sys, re
p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"],
                   capture_output=True, text=True)
print(p.stdout[-4000:], p.stderr[-2000:], file=sys.stderr)
tail = [l for l in p.stdout.splitlines() if re.search(r"passed|failed|skipped|error|deselected", l)]
summary = (tail[-1] if tail else "no summary").strip("= ")
print(f"| C pytest -m gpu | exit {p.returncode} | {summary} |")
'


# ---- run order: most informative first, so a short budget (GPU_CHECK_BUDGET_S) still covers them ----
E_PY='
import subprocess, sys
p = subprocess.run([sys.executable, "benchmarks/step_time.py", "--device", "cuda", "--steps", "30", "--repeats", "2"],
                   capture_output=True, text=True)
print(p.stdout[-2000:], p.stderr[-2000:], file=sys.stderr)
for line in p.stdout.splitlines():
    if line.startswith(("ours", "plain", "ratio")):
        print(f"| E loop overhead, DCGAN-64 b32 RaSGAN fp32 | {line.split(":")[0]} | {line.split(":", 1)[1].strip()} |")
sys.exit(p.returncode)
'

part "A DCGAN-64"  90 python3 -c "$THROUGHPUT_PY" 64 64 64 40 $MATRIX
part "C fp16+R1 single" 60 bash -c "$C_SH check 'fp16 GradScaler + R1, single' python3 \${TRAIN[@]} train.precision=fp16 loss.penalty=r1 model.d_batch_norm=false train.steps=30"
part "C ddp BN broadcast" 60 bash -c "$C_SH check 'ddp(1), BatchNorm in G and D, broadcast_buffers=false (default), 2 D forwards/backward' python3 \${TR[@]} \${TRAIN[@]} dist.strategy=ddp model.d_batch_norm=true dist.broadcast_buffers=false train.steps=20"
part "C deepspeed ZeRO-2 bf16 R1" 90 bash -c "$C_SH check 'deepspeed(1) ZeRO-2, bf16, R1 penalty, checkpoint' python3 \${TR[@]} \${TRAIN[@]} dist.strategy=deepspeed dist.deepspeed_config=configs/deepspeed/zero2.json train.precision=bf16 loss.penalty=r1 model.d_batch_norm=false train.steps=20 checkpoint.every=10"
part "E ours vs plain loop" 60 python3 -c "$E_PY"
part "A DCGAN-256" 90 python3 -c "$THROUGHPUT_PY" 256 32 32 20 $MATRIX
part "B ddp/deepspeed ZeRO-0" 120 python3 -c "$B_PY" 0
part "C ddp SyncBN" 60 bash -c "$C_SH check 'ddp(1), SyncBatchNorm, bf16' python3 \${TR[@]} \${TRAIN[@]} dist.strategy=ddp dist.sync_batchnorm=true train.precision=bf16 train.steps=20"
part "C pytest -m gpu" 90 python3 -c "$GPU_TESTS_PY"
part "A DCGAN-128" 90 python3 -c "$THROUGHPUT_PY" 128 64 64 30 $MATRIX
part "B ddp/deepspeed ZeRO-2" 90 python3 -c "$B_PY" 2
part "D compile DCGAN-64"  180 python3 -c "$THROUGHPUT_PY" 64 64 64 40 bf16:true:false bf16:true:true bf16:true:true:r1
part "D compile DCGAN-128" 150 python3 -c "$THROUGHPUT_PY" 128 64 64 30 bf16:true:false bf16:true:true


TABLE=$( { echo; echo "| part | configuration | result |"; echo "|---|---|---|"; cat "$RES";
           echo; echo "Elapsed $(( $(date +%s) - START )) s of a ${BUDGET} s budget. img/s counts real images"\
" consumed by the loop (one D batch + one fresh G batch per outer step), n_dis = 1, RaSGAN, no penalty in A/B/D."; } )
echo "$TABLE"
if [[ -n "${OUT:-}" ]]; then
  { sed 's/$/  /' "$ENVF"; echo "$TABLE"; } > "$OUT/gpu_results.md"
fi
