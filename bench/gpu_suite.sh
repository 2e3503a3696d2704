#!/usr/bin/env bash
# Every GPU check and measurement flowopd owes, in one call of ~8 minutes on the lent H200 (torch 2.11 + triton 3.6,
# Python 3.12; the image lacks diffusers, deepspeed, nvtx: they come as wheels). bench/results/OWED.md says what
# each step settles.
#
#   here, once (where pip works):   echo /.whl/ >> .git/info/exclude && /work/shared/tools/gpu-wheels.sh
#   on the GPU machine, repo root:  FLOWOPD_COMMIT=<git rev-parse HEAD> bash bench/gpu_suite.sh
#     (device tool: carry [".whl"], timeout_s 600; results land in $OUT, else ./gpu-results)
#   a rerun of some steps:          bash bench/gpu_suite.sh --only probe,native
#   the control flow on a CPU:      bash bench/gpu_suite.sh --dry-run   (smoke sizes, ~2 min; CI runs it)
#
# Steps in order of value, each under `timeout -s INT` (pytest-benchmark writes its JSON on SIGINT, not on SIGTERM)
# with its own limit; the limits add up to 470 s of a 480 s budget (FLOWOPD_SUITE_BUDGET), and a step never gets
# more than what is left, so a slow or hung step leaves the earlier results and shortens only the later ones:
#   wheels    30  install .whl/ in one pip call; if pip refuses the set, one wheel at a time (a bad wheel loses itself)
#   gate      25  import gate naming every missing module + versions, device, driver, commit -> env.json
#   cuda      85  pytest -v -m cuda on the named kernel/attention/LoRA/graph test files (a module that fails to
#                 import is reported, the others run: --continue-on-collection-errors)
#   fast      90  bench/test_iteration.py -k fast (1 warm-up, 3 rounds): s/it, MFU, GPU seconds per phase, rollout
#                 mode, peak memory, host-sync census by file:line -> bench-iteration.json
#   probe     45  bench/gpu_probe.py: SDPA kernels at SD3.5-M shapes, checkpointing on vs off, LoRA merge
#                 crossover -> probe.json
#   attention 40  bench/test_attention.py without torch.compile providers, 5 rounds -> bench-attention.json
#   teachers  45  bench/test_multi_teacher.py (K = 1, 2, 4, 8; 2 rounds) -> bench-multi_teacher.json
#   native    45  the csrc/ build started at the beginning (TORCH_CUDA_ARCH_LIST=9.0, cuobjdump of its cubins), the
#                 cuda backend's parity tests, bench/test_sde_step.py -> bench-sde_step.json
#   reference 65  bench/test_iteration.py -k reference (1 warm-up, 2 rounds, no census) -> bench-iteration-reference.json
#                 (the fast/reference ratio)
# At most 8 files come back, all at $OUT's top: suite.log env.json probe.json bench-{iteration,iteration-reference,
# attention,multi_teacher,sde_step}.json. env.json is rewritten after every step (its "steps" table), the summary
# table is the log's (and stdout's) last lines.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
ONLY=""
while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --only) ONLY=",$2,"; shift ;;
    *) echo "usage: bash bench/gpu_suite.sh [--dry-run] [--only step,step]" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-$ROOT/gpu-results}
mkdir -p "$OUT"
LOG=$OUT/suite.log
BUDGET=${FLOWOPD_SUITE_BUDGET:-480}
T0=$SECONDS
PY=${PYTHON:-python3}
SITE=/tmp/site
WORK=$(mktemp -d /tmp/flowopd-suite.XXXXXX)
export PYTHONUNBUFFERED=1 FLOWOPD_COMMIT=${FLOWOPD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
if ((DRY)); then
  SITE=$WORK/site  # never touch the real /tmp/site from a dry run
  export FLOWOPD_BENCH_SMOKE=1 CUDA_VISIBLE_DEVICES=""  # CPU, smoke sizes, every GPU path skipped or emulated
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# every step is one process of its own: inherited RANK/MASTER_PORT (a launcher, a test) would join another group
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT
STEPS=$WORK/steps.tsv
: >"$STEPS"
: >"$LOG"
PLAN="wheels:30 gate:25 cuda:85 fast:90 probe:45 attention:40 teachers:45 native:45 reference:65"

log() { echo "[gpu_suite +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }

# env.json = the gate's environment + the steps so far (rewritten after each step, so a cut-off run keeps it)
write_env() {
  "$PY" - "$WORK/env-base.json" "$STEPS" "$OUT/env.json" <<'EOF' 2>>"$LOG"
import json, pathlib, sys
base, steps, out = (pathlib.Path(a) for a in sys.argv[1:])
env = json.loads(base.read_text()) if base.is_file() else {}
env["steps"] = [dict(zip(("step", "rc", "seconds", "limit", "result"), line.split("\t")))
                for line in steps.read_text().splitlines() if line]
out.write_text(json.dumps(env, indent=1))
EOF
}

# step NAME LIMIT CMD...: run CMD under `timeout -s INT` with min(LIMIT, budget left); record rc, seconds, pytest's
# last line in the steps table
step() {
  local name=$1 limit=$2 left rc start result
  shift 2
  if [[ -n $ONLY && $ONLY != *",$name,"* ]]; then return 0; fi
  left=$((BUDGET - (SECONDS - T0)))
  if ((left < 10)); then
    log "skip $name: suite budget spent"
    printf '%s\tskipped\t0\t%s\tbudget spent\n' "$name" "$limit" >>"$STEPS"
    write_env
    return 0
  fi
  ((limit > left)) && limit=$left
  log "start $name (limit ${limit}s)"
  start=$SECONDS
  timeout -s INT -k 15 "$limit" "$@" >"$WORK/$name.out" 2>&1
  rc=$?
  cat "$WORK/$name.out" >>"$LOG"
  result=$(grep -E "[0-9]+ (passed|failed|skipped|error)" "$WORK/$name.out" | tail -n 1 | tr -d '=\t' | sed 's/^ *//')
  ((rc == 124)) && result="TIMED OUT (SIGINT) ${result}"
  log "end $name rc=$rc ($((SECONDS - start))s) ${result}"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" "${result:-}" >>"$STEPS"
  write_env
}

# bench NAME LIMIT FILE [pytest args]: a pytest-benchmark file -> $OUT/bench-NAME.json
bench() {
  local name=$1 limit=$2 file=$3
  shift 3
  step "$name" "$limit" "$PY" -m pytest -q -s "$file" -p no:cacheprovider --benchmark-json="$OUT/bench-$JSON.json" \
    --benchmark-columns=median,min,max,rounds "$@"
}

log "plan (seconds): $PLAN; budget ${BUDGET}s; dry run $DRY; commit $FLOWOPD_COMMIT"

# ---- native build in the background from the start (niced, 6 of 16 cores: the GPU steps run meanwhile)
(
  prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)') &&
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} timeout -k 10 90 nice -n 19 cmake -S . -B "$WORK/build" \
      -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" &&
    timeout -k 10 240 nice -n 19 cmake --build "$WORK/build" -j 6
  echo $? >"$WORK/native.rc"
) >"$WORK/native-build.log" 2>&1 &

# ---- wheels: one pip call; pip checks every wheel before installing any, so on failure one wheel at a time
wheels=.whl
if ((DRY)); then  # a good wheel and a broken one: the dry run takes the per-wheel path and the gate names the loss
  wheels=$WORK/whl
  "$PY" - "$wheels" <<'EOF'
import base64, hashlib, pathlib, sys, zipfile
out = pathlib.Path(sys.argv[1]); out.mkdir()
files = {"flowopd_dry/__init__.py": "VERSION = '0'\n",
         "flowopd_dry-0.dist-info/METADATA": "Metadata-Version: 2.1\nName: flowopd_dry\nVersion: 0\n",
         "flowopd_dry-0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_suite\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
def digest(text): return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
record = "".join(f"{n},sha256={digest(t)},{len(t.encode())}\n" for n, t in files.items())
with zipfile.ZipFile(out / "flowopd_dry-0-py3-none-any.whl", "w") as z:
    for n, t in {**files, "flowopd_dry-0.dist-info/RECORD": record + "flowopd_dry-0.dist-info/RECORD,,\n"}.items():
        z.writestr(n, t)
(out / "flowopd_broken-0-py3-none-any.whl").write_text("not a zip file")
EOF
fi
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  pipi=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
  step wheels 30 bash -c "$(printf '%q ' "${pipi[@]}") \"\$@\" || { echo 'bulk install refused: one wheel at a time';
    for w in \"\$@\"; do $(printf '%q ' "${pipi[@]}") \"\$w\" || echo \"WHEEL FAILED: \$w\"; done; }" _ "$wheels"/*.whl
else
  log "no $wheels/*.whl: diffusers, deepspeed, nvtx must already be importable"
fi

# ---- gate: versions, device, and every module the steps import, named when missing
step gate 25 "$PY" - "$WORK/env-base.json" <<'EOF'
import importlib, importlib.metadata as md, json, os, platform, subprocess, sys
def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""
need = ["torch", "triton", "diffusers", "peft", "transformers", "deepspeed", "safetensors", "pytest", "pytest_benchmark",
        "nvtx", "flowopd_dry"]
imports, missing = {}, []
for name in need:
    try:
        importlib.import_module(name)
        try:
            imports[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            imports[name] = "importable"
    except Exception as exc:  # noqa: BLE001 - report why, whatever it is
        imports[name] = f"MISSING: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        if name not in ("nvtx", "flowopd_dry"):  # nvtx is optional; flowopd_dry exists only in a dry run
            missing.append(name)
import torch
p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
env = {"device": p.name if p else "cpu", "sm": f"{p.major}.{p.minor}" if p else "", "sms": p.multi_processor_count if p else 0,
       "memory_gib": round(p.total_memory / 2**30, 1) if p else 0, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
       "driver": sh("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
       "clocks": sh("nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem", "--format=csv,noheader"),
       "python": platform.python_version(), "imports": imports, "missing": missing,
       "commit": os.environ.get("FLOWOPD_COMMIT", "unknown"),
       "tools": {t: (sh(t, "--version").splitlines() or [""])[-1] for t in ("nvcc", "cmake", "ninja", "cuobjdump", "nsys", "ncu")}}
open(sys.argv[1], "w").write(json.dumps(env, indent=1))
print(json.dumps(env, indent=1))
print("import gate:", "ok" if not missing else "MISSING " + ", ".join(missing))
sys.exit(1 if missing else 0)
EOF

# ---- CUDA numerics of the compiled kernels: named files, so one module that fails to import loses only itself
step cuda 85 "$PY" -m pytest -v -m cuda -p no:cacheprovider --continue-on-collection-errors -rfEs \
  tests/test_sde_kernel.py tests/test_lora_segmented_kernel.py tests/test_qk_rmsnorm.py tests/test_fused_attention.py \
  tests/test_multi_lora.py tests/test_multi_lora_merged.py tests/test_rollout_graph.py tests/test_host_syncs.py \
  tests/test_compile_blocks.py

rounds=3 warmup=1  # the warm-up step holds Triton JIT, cuBLAS heuristics and the rollout graph's capture
((DRY)) && rounds=1
JSON=iteration FLOWOPD_BENCH_ROUNDS=$rounds FLOWOPD_BENCH_WARMUP=$warmup \
  bench fast 90 bench/test_iteration.py -k fast

step probe 45 "$PY" bench/gpu_probe.py --out "$OUT/probe.json"

dry_k=()
((DRY)) && dry_k=(-k "fwd and not bwd and not dual")  # the CPU smoke: the forward cases of one block kind
JSON=attention FLOWOPD_BENCH_ROUNDS=$((rounds + 2)) bench attention 40 bench/test_attention.py "${dry_k[@]}"
((DRY)) && dry_k=(-k "1-")
JSON=multi_teacher FLOWOPD_BENCH_ROUNDS=$((rounds > 2 ? 2 : rounds)) bench teachers 45 bench/test_multi_teacher.py \
  "${dry_k[@]}"

# ---- native: wait for the background build (its own timeouts end it), check its cubins, its parity, the SDE bench
native_step() {
  local waited=0 lib=$WORK/build/libflowopd_native.so
  while [[ ! -f $WORK/native.rc ]] && ((waited < 30)); do sleep 1; waited=$((waited + 1)); done
  echo "native build: rc $(cat "$WORK/native.rc" 2>/dev/null || echo 'none yet: still running after the wait')"
  tail -n 25 "$WORK/native-build.log"
  if [[ -f $lib ]]; then
    export FLOWOPD_NATIVE_LIB=$lib
    command -v cuobjdump >/dev/null && cuobjdump --list-elf "$lib"  # sm_90 cubins only: the arch list was honoured
    "$PY" -m pytest -v -m cuda -p no:cacheprovider -rfEs tests/test_sde_kernel.py -k cuda
  else
    echo "no $lib: the sde_step bench compares reference and triton only"
  fi
  "$PY" -m pytest -q -s bench/test_sde_step.py -p no:cacheprovider --benchmark-json="$OUT/bench-sde_step.json" \
    --benchmark-columns=median,min,max,rounds
}
export WORK PY OUT
step native 45 bash -c "$(declare -f native_step); native_step"

JSON=iteration-reference FLOWOPD_BENCH_ROUNDS=$((rounds > 2 ? 2 : rounds)) FLOWOPD_BENCH_WARMUP=1 FLOWOPD_BENCH_CENSUS=0 \
  bench reference 65 bench/test_iteration.py -k reference

# ---- env into every benchmark JSON; the summary table (the last lines the device tool returns)
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, json.JSONDecodeError):
        return None
for f in sorted(out.glob("bench-*.json")):
    data = load(f.name)
    if data is None:
        print(f"{f.name}: incomplete JSON")
        continue
    data["flowopd_suite"] = {k: v for k, v in env.items() if k != "steps"}
    f.write_text(json.dumps(data, indent=1))
print("steps:")
for s in env.get("steps", []):
    print(f"  {s['step']:<10} rc={s['rc']:<8} {s['seconds']:>4}s/{s['limit']:>3}s  {s.get('result', '')}")
its = {}
for name in ("bench-iteration.json", "bench-iteration-reference.json"):
    for b in (load(name) or {}).get("benchmarks", []):
        e = b["extra_info"]
        its[e["path"]] = e
        print(f"  iteration {e['path']:>9}: {e['s_per_iteration']:.3f} s/it  MFU {e['mfu']:.1%}  rollout {e['rollout_mode']}"
              f"  peak {e.get('peak_mem_gib')} GiB  host syncs {e.get('host_syncs_total')}")
if {"fast", "reference"} <= its.keys():
    print(f"  fast / reference: {its['reference']['s_per_iteration'] / its['fast']['s_per_iteration']:.2f}x (goal 2.5x)")
probe = load("probe.json") or {}
for name, part in probe.get("parts", {}).items():
    print(f"  probe {name}: {'ERROR ' + part['error'] if 'error' in part else 'ok'} ({part.get('seconds', 0):.0f}s)")
print(f"files in {out}: {sorted(p.name for p in out.iterdir())}")
EOF
log "done"
rm -rf "$WORK"
