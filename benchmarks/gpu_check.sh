#!/usr/bin/env bash
# The prepared device check: everything k2 must do on one GPU, inside a time budget, into one results file.
#
#   bash benchmarks/gpu_check.sh [BUDGET_S] [--budget S] [--out FILE] [--wheels DIR] [--dry-run] [--cpu]
#
# Run from anywhere on a machine with torch (CUDA) and no network: it needs no k2 install (PYTHONPATH=src)
# and uses $PYTHON, else .venv/bin/python, else python3. Python packages the machine lacks can travel as
# wheels: --wheels DIR (default ./.whl when it exists) installs DIR/*.whl into a throwaway folder first.
# Steps, in order, each under `timeout`:
#   env        torch, CUDA, triton versions and the GPU's name
#   deps       k2's other imports (the chain needs datasets, rich_click, jsonschema, ...): names the missing
#   pytest     `pytest -m gpu`: bf16 training step, the Triton kernel vs the reference, MFU peak, bf16 generate
#   bench-*    benchmarks/bench_model.py --sections gpu (small, then gpu preset): k2 eager / compiled vs
#              transformers, tokens/s, MFU against the honest peak, the max-logit statistic's share
#   chain      every stage of the `small` chain, shortened (a few steps each), in a throwaway $K2_ARTIFACTS
# Each step gets a share of the time still left (shares by weight below), so a step that fails or
# finishes early leaves its time to the rest, and the whole run ends within the budget whatever fails.
# Without CUDA the GPU steps are recorded as skipped (--cpu runs them anyway; --dry-run runs nothing
# but the env step and records the commands). The results file (default $OUT/gpu_check-results.md
# when $OUT is set, else benchmarks/gpu_check-results.md) is rewritten after every step; full logs
# go to gpu_check-logs/ beside it. Exit status: 0 when every step that ran passed, 1 otherwise.

set -u
BUDGET=480
RESULTS=""
DRY=0
FORCE_CPU=0
WHEELS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET="$2"; shift 2 ;;
        --out) RESULTS="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --cpu) FORCE_CPU=1; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        [0-9]*) BUDGET="$1"; shift ;;
        *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "error: the budget must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY="$(command -v python3 || command -v python)"; fi
if [ -z "$RESULTS" ]; then RESULTS="${OUT:+$OUT/gpu_check-results.md}"; RESULTS="${RESULTS:-benchmarks/gpu_check-results.md}"; fi
mkdir -p "$(dirname "$RESULTS")"
LOGS="$(dirname "$RESULTS")/gpu_check-logs"
mkdir -p "$LOGS"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/k2-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export K2_ARTIFACTS="$WORK/artifacts"
[ -z "$WHEELS" ] && [ -d .whl ] && WHEELS=.whl
if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WHEELS"/*.whl \
        > "$LOGS/wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=4   # seconds kept for the last write of the results file
GRACE=3     # timeout's kill-after: a step that ignores SIGTERM is SIGKILLed this much later
FLOOR=8     # no step gets less than this while the budget lasts
ROWS=""     # markdown table rows
DETAILS=""  # per-step log tails
FAILED=0

# name:weight of every step, in order (a step's share = time left x weight / weights still to run)
STEPS="env:1 deps:1 pytest:8 bench-small:6 bench-gpu:8 synth:1 rephrase:1 pretrain:3 midtrain:2 extend-context:2 agentic:1 sft:2 rl:3 eval:2 report:1"
weight_left() {  # the summed weights of the step named $1 and all after it
    local seen=0 total=0 s
    for s in $STEPS; do
        [ "${s%%:*}" = "$1" ] && seen=1
        [ $seen = 1 ] && total=$((total + ${s##*:}))
    done
    echo $total
}
weight_of() { local s; for s in $STEPS; do [ "${s%%:*}" = "$1" ] && echo "${s##*:}"; done; }

write_results() {
    local now=$(date +%s)
    {
        echo "# k2 GPU check"
        echo
        echo "Started $(date -u -d "@$START" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || date -u), budget ${BUDGET} s, elapsed $((now - START)) s."
        echo "Python: \`$PY\`; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); machine: ${CUDA_DESC:-?}."
        echo
        echo "| step | status | seconds | limit s | command |"
        echo "|---|---|---:|---:|---|"
        printf "%b" "$ROWS"
        echo
        printf "%b" "$DETAILS"
    } > "$RESULTS.tmp" && mv "$RESULTS.tmp" "$RESULTS"
}

# run_step NAME NEEDS_CUDA CMD... : run CMD under its share of the time left, record the outcome
run_step() {
    local name="$1" needs_cuda="$2"; shift 2
    local now=$(date +%s)
    local left=$((DEADLINE - now - RESERVE - GRACE))
    local limit=$((left * $(weight_of "$name") / $(weight_left "$name")))
    local floor=$FLOOR; [ "$name" = env ] && floor=60  # importing torch alone can take long on a busy machine
    [ $limit -lt $floor ] && limit=$((left < floor ? left : floor))  # starting python + torch takes seconds
    local status seconds=0 rc log="$LOGS/$name.log"
    local cmd="$*"
    if [ "$needs_cuda" = 1 ] && [ "$HAVE_CUDA" != 1 ] && [ "$FORCE_CPU" != 1 ]; then
        status="skipped (no CUDA)"; limit=0
    elif [ $limit -lt 2 ]; then
        status="skipped (budget spent)"; limit=0
    elif [ $DRY = 1 ] && [ "$name" != env ]; then
        status="dry-run"
    else
        echo "== $name (limit ${limit}s): $cmd" >&2
        timeout --kill-after=$GRACE "$limit" "$@" > "$log" 2>&1
        rc=$?
        seconds=$(( $(date +%s) - now ))
        case $rc in
            0) status="ok" ;;
            124|137) status="**timeout**"; FAILED=1 ;;
            *) status="**failed (exit $rc)**"; FAILED=1 ;;
        esac
        DETAILS+="<details><summary>$name: $status, last lines of the log</summary>\n\n\`\`\`\n$(tail -n 40 "$log" | sed 's/`/'"'"'/g')\n\`\`\`\n</details>\n\n"
        if [ "${name%%-*}" = bench ] && [ $rc = 0 ]; then  # the benchmark's own markdown, in full
            DETAILS+="## Training benchmark ($name)\n\n$(sed -n '/^## /,$p' "$log" | sed 's/\\/\\\\/g')\n\n"
        fi
    fi
    ROWS+="| $name | $status | $seconds | $limit | \`$(printf '%s' "$cmd" | tr '\n' ' ' | sed "s|$ROOT/||g; s/|/\\\\|/g; s/  */ /g")\` |\n"
    write_results
}

# --- env: what machine is this? (the one probe of torch/CUDA; it may take a minute on a cold disk)
HAVE_CUDA=0
cat > "$WORK/probe.py" <<'EOF'
import sys, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "absent"
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"python {sys.version.split()[0]}; {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}")
print(f"cuda={int(torch.cuda.is_available())}")
EOF
run_step env 0 "$PY" "$WORK/probe.py"
grep -q '^cuda=1' "$LOGS/env.log" 2>/dev/null && HAVE_CUDA=1
CUDA_DESC="$(head -n 1 "$LOGS/env.log" 2>/dev/null)"
write_results

# --- k2's imports beyond torch (what the CLI and the chain need; the model and the GPU tests need only rich
# and safetensors): a missing one fails this step with its name, the chain's stages fail fast after it
run_step deps 0 "$PY" -c '
import importlib.util, sys
need = ["click", "rich", "rich_click", "safetensors", "datasets", "tokenizers", "numpy", "matplotlib", "jsonschema"]
optional = ["transformers", "triton"]  # the benchmark side / the attention kernel (sdpa without it)
missing = [n for n in need if importlib.util.find_spec(n) is None]
print("missing:", " ".join(missing) or "none")
print("optional, missing:", " ".join(n for n in optional if importlib.util.find_spec(n) is None) or "none")
sys.exit(1 if missing else 0)'

# --- the GPU tests and the training benchmark
# (only the files that hold gpu-marked tests: collecting the whole suite would need every optional package)
run_step pytest 1 "$PY" -m pytest -q -m gpu -rfEs -p no:cacheprovider $(grep -l "mark.gpu" tests/test_*.py)
# (one preset per run, so that the small preset's figures survive if the gpu preset runs out of time)
run_step bench-small 1 "$PY" benchmarks/bench_model.py --sections gpu --gpu-presets small --threads 0 --no-write
run_step bench-gpu 1 "$PY" benchmarks/bench_model.py --sections gpu --gpu-presets gpu --threads 0 --no-write

# --- every stage of the small chain, shortened (a few optimizer steps each; bf16 via precision=auto)
K2=("$PY" -m k2cli.cli)
R=recipes/small
SHORT=(--set train.eval_every=5 --set train.checkpoint_every=5)
run_step synth 1 "${K2[@]}" data synth --recipe $R/synth.toml --set world.size=500 --set math.count=300
run_step rephrase 1 "${K2[@]}" rephrase --recipe $R/rephrase.toml --set rewrite.rewrites=1
run_step pretrain 1 "${K2[@]}" pretrain --recipe $R/pretrain.toml --set train.steps=20 --set train.eval_every=10 --set train.checkpoint_every=10
run_step midtrain 1 "${K2[@]}" pretrain --recipe $R/midtrain.toml --out midtrain --set train.steps=10 "${SHORT[@]}"
run_step extend-context 1 "${K2[@]}" extend-context --recipe $R/extend_context.toml --set train.steps=5 "${SHORT[@]}" --set eval.passkey_trials=2
run_step agentic 1 "${K2[@]}" agentic --recipe $R/agentic.toml --set tools.count=200 --set agents.count=50 --set agents.test_count=10
run_step sft 1 "${K2[@]}" sft --recipe $R/sft.toml --set train.steps=10 "${SHORT[@]}"
run_step rl 1 "${K2[@]}" rl --recipe $R/rl.toml --set train.steps=2 --set train.batch_size=64 --set train.micro_batch_size=32 \
    --set train.eval_every=1 --set train.checkpoint_every=1 --set envs.train_size=64 --set envs.test_size=16 \
    --set rl.gen_batch_size=64 --set rl.eval_prompts=16 --set select.candidates=64 --set critic.heldout_prompts=8 \
    --set critic.heldout_pairs=16
run_step eval 1 "${K2[@]}" eval pretrain:latest --label pretrain midtrain:latest --label midtrain extend-context:latest \
    --label extend-context sft:latest --label sft rl:latest --label rl --recipe $R/eval.toml --set eval.max_examples=20
run_step report 1 "${K2[@]}" report eval:latest

echo "results: $RESULTS" >&2
exit $FAILED
