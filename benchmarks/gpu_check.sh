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
#       (GPU_CHECK_BUDGET_S, default 470 s; ~8 minutes with the machine's start) is spent:
#         T  the test suite's `-m gpu` tests (CUDA-only: compiled steps vs eager, CUDA graphs, data reader, ...)
#         S  benchmarks/step_time.py --matrix gpu: ours vs the plain loop, DCGAN-64 b64/b256 and DCGAN-256,
#            fp32/bf16, compile none/default/reduce-overhead, single vs ddp(1) vs deepspeed(1), peak GPU memory,
#            and R1 with loss.penalty_every=16 vs unpenalised; raw JSON to $OUT/step_time_gpu_cuda.json
#            (commit it as benchmarks/results/step_time_gpu_cuda.json; `step_time.py --table` makes the table)
#         C  GPU-only correctness checks: fp16 GradScaler + lazy R1; DDP with BatchNorm (two D forwards
#            per backward); DeepSpeed ZeRO-2 bf16 + R1 + checkpoint; SyncBatchNorm
#       Prints a markdown table; with $OUT set also writes $OUT/gpu_results.md and $OUT/gpu_check.log.
#   GPU_CHECK_PARTS=TS runs only those parts (default TSC).
#   Dry run of the plumbing anywhere: GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh
#       (step_time then runs `--device cpu --quick`: every case of the GPU matrix on tiny models; the
#       CUDA-only checks fail as rows, which is the point: every failure is a row, never the end).
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

BUDGET=${GPU_CHECK_BUDGET_S:-470}
PARTS=${GPU_CHECK_PARTS:-TSC}
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

# ---- S: our loop vs the plain loop, the GPU matrix (benchmarks/step_time.py) -------------------------
S_PY='
import os, subprocess, sys
dev, budget, case_timeout = os.environ["RGAN_DEV"], sys.argv[1], sys.argv[2]
out = os.path.join(os.environ.get("OUT") or "/tmp", f"step_time_gpu_{dev}.json")
cmd = [sys.executable, "benchmarks/step_time.py", "--matrix", "gpu", "--device", dev, "--steps", "48",
       "--repeats", "2", "--budget-s", budget, "--case-timeout-s", case_timeout, "--out", out]
if dev != "cuda":
    cmd.append("--quick")
# rows as each case ends: the JSON is rewritten per case too, so a cut-short run keeps what it measured
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
for line in p.stdout:
    print(line.rstrip(), file=sys.stderr)
    if line.startswith("| DCGAN"):  # configuration | strategy | ours | ref | against | wall | cpu | mem
        c = [x.strip() for x in line.strip().strip("|").split("|")]
        print(f"| S {c[0]}, {c[1]} | ours {c[2]} ms vs {c[4]} {c[3]} ms | ratio {c[5]}; peak GiB {c[7]} |", flush=True)
sys.exit(p.wait())
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
part "T pytest -m gpu" 150 python3 -c "$GPU_TESTS_PY"
# inner limits (no case starts after 150 s, a case ends within 110 s) stay inside the part's 280 s, so the
# part's timeout never has to kill step_time.py's own case processes
part "S step time, ours vs plain" 280 python3 -c "$S_PY" 150 110
part "C fp16+R1 single" 50 bash -c "$C_SH check 'fp16 GradScaler + R1 every 4th D step, single' python3 \${TRAIN[@]} train.precision=fp16 loss.penalty=r1 loss.penalty_every=4 model.d_batch_norm=false train.steps=30"
part "C ddp BN" 50 bash -c "$C_SH check 'ddp(1), BatchNorm in G and D, 2 D forwards/backward' python3 \${TR[@]} \${TRAIN[@]} dist.strategy=ddp model.d_batch_norm=true train.steps=20"
part "C deepspeed ZeRO-2 bf16 R1" 70 bash -c "$C_SH check 'deepspeed(1) ZeRO-2, bf16, R1 penalty, checkpoint' python3 \${TR[@]} \${TRAIN[@]} dist.strategy=deepspeed dist.deepspeed_config=configs/deepspeed/zero2.json train.precision=bf16 loss.penalty=r1 model.d_batch_norm=false train.steps=20 checkpoint.every=10"
part "C ddp SyncBN" 50 bash -c "$C_SH check 'ddp(1), SyncBatchNorm, bf16' python3 \${TR[@]} \${TRAIN[@]} dist.strategy=ddp dist.sync_batchnorm=true train.precision=bf16 train.steps=20"

TABLE=$( { echo; echo "| part | configuration | result |"; echo "|---|---|---|"; cat "$RES";
           echo; echo "Elapsed $(( $(date +%s) - START )) s of a ${BUDGET} s budget. img/s counts real images"\
" S: ms per outer step (n_dis = 1, RaSGAN), median (range) of interleaved repeats; ratio = median of per-repeat ours/reference."; } )
echo "$TABLE"
if [[ -n "${OUT:-}" ]]; then
  { sed 's/$/  /' "$ENVF"; echo "$TABLE"; } > "$OUT/gpu_results.md"
fi
