#!/usr/bin/env bash
# The pending GPU figures of docs/benchmarks.md in one run on a lent GPU machine.
#
# Prepare here, once (the GPU image lacks ml-collections; see ../shared/DESIGN.md):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0
# then run it through the device tool, one part a command (each part's limits fit one command):
#   run(command="bash benchmarks/gpu_checks.sh resnet", carry=[".whl"], timeout_s=540)
#   run(command="bash benchmarks/gpu_checks.sh vit", carry=[".whl"], timeout_s=240)
# Without an argument both parts run (where no per-command limit applies).
# Each check runs under its own time limit, so one slow compile cannot eat the rest; the log and
# the profile's Perfetto trace land in $OUT (or ./gpu_checks when OUT is unset).
set -uo pipefail

part=${1:-all}
if [[ ! $part =~ ^(all|resnet|vit)$ ]]; then
  echo "gpu_checks.sh: part '$part' is not one of all, resnet, vit" >&2
  exit 2
fi
out=${OUT:-gpu_checks}
mkdir -p "$out"
log=$out/gpu_checks.log
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# check LIMIT_S COMMAND...: runs it under a time limit, teeing its output and exit code to the log.
check() {
  local limit=$1
  shift
  echo "### $(date -u +%FT%TZ) $* (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "### exit ${PIPESTATUS[0]}" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } | tee -a "$log"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$log"

step=benchmarks/train_step.py
# resnet: about 8.6 minutes of limits; vit: 3.5. A lease has 15 minutes of device time, start-up
# included: the two parts fit one lease when the compiles stay well inside their limits.
if [[ $part != vit ]]; then
check 120 python3 $step --preset=resnet50_224 --batch_size=256 --dtype=bfloat16 \
  --profile_dir="$out/profile_r50"
check 75 python3 $step --preset=resnet50_224 --batch_size=512 --dtype=bfloat16
check 60 python3 $step --preset=resnet50_224 --batch_size=256 --dtype=bfloat16 --no_augment
check 50 python3 $step --preset=resnet50_224 --batch_size=256 --dtype=bfloat16 --host_size=256
check 45 python3 $step --preset=resnet18_cifar32 --batch_size=512
check 45 python3 $step --preset=resnet18_cifar32 --batch_size=1024
check 45 python3 benchmarks/augment.py --image_size=32 --image_size=224
check 75 python3 benchmarks/loss_memory.py --max_batch=65536 --max_run_gib=70
fi

if [[ $part != resnet ]]; then
check 80 python3 $step --preset=vit_b16_224 --batch_size=256 --dtype=bfloat16
check 45 python3 $step --preset=vit_s4_32 --batch_size=512 --dtype=bfloat16
# MoCo v3 (its recipe's model) once the method is registered.
if python3 -c "from simclr_jax import methods; assert 'mocov3' in methods.names()" 2>/dev/null
then
check 80 python3 $step --preset=vit_b16_224 --batch_size=256 --dtype=bfloat16 --method=mocov3
fi
fi

# Only the Perfetto trace comes back (the tool returns 8 files at most, 2 folders deep).
trace=$(find "$out/profile_r50" -name perfetto_trace.json.gz 2>/dev/null | head -n 1)
if [[ -n $trace ]]; then
  cp "$trace" "$out/perfetto_trace_r50.json.gz"
  rm -rf "$out/profile_r50"
fi
