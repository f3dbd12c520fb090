#!/usr/bin/env bash
# Throughput against the peers on ONE H200 (issue 15), in stages: each stage is one command of the GPU
# machine (<= 10 min), printed with its expected duration. Run from the repository root:
#   bash tools/bench/throughput_gpu.sh STAGE
# Wheels made on the CPU machine beforehand (no internet on the GPU machine):
#   bash ../shared/gpu/make-wheels.sh                      -> .whl (deepspeed and its needs)
#   bash tools/bench/make_torchtitan_wheels.sh            -> .whl-tt (torchtitan 0.2.2 and its imports; carried
#                                                             with .whl for `--baselines torchtitan`)
#   bash ../shared/gpu/make-cute-wheels.sh                 -> .cute-a, .cute-b (FA4: two commands back to back,
#                                                             as tools/bench/long_seq_gpu.sh says)
# Every stage installs what is carried (fast when already there) and writes JSON under $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/throughput_out}; mkdir -p "$OUT"
setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl $(ls .whl-tt/*.whl 2>/dev/null)
  if [ -d .cute-b ]; then
    source .cute-b/install-cute.sh
    # quack keys its kernel cache by fingerprinting epilogue code and takes code under a site-packages folder
    # as an installed library (keyed by name); unpacked in /tmp/cute its epilogues fail to build: import the
    # unpacked wheels through a site-packages path (megatron/model/mlp_support.py)
    mkdir -p /tmp/py && ln -sfn /tmp/cute /tmp/py/site-packages
    CUTE_PATH=/tmp/py/site-packages:/tmp/py/site-packages/nvidia_cutlass_dsl/dsl_packages
  fi
  export PYTHONPATH=$PWD:/tmp/site${CUTE_PATH:+:$CUTE_PATH}
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
}
need_cute() {  # the stages that measure quack or FA4: a call that did not carry .cute-b measures the torch path
  [ -d .cute-b ] || { echo "stage $1 needs the CuTe wheels: carry .cute-b (and .whl) in this call, after the" \
    "cp -r .cute-a /tmp/cute-a call on the same warm machine"; exit 2; }
}
before_and_after_410m() {  # $1: what to call this tree's JSON. 410M (2048 x 8) with the files under .ab-before/
  # (carried; the caller fills it with `git show REV:path`) laid over a copy of this tree, then with this tree
  [ -d .ab-before ] || { echo "stage $stage needs .ab-before (carried)"; exit 2; }
  local before=/tmp/before rest=${PYTHONPATH#"$PWD":}
  rm -rf "$before"; mkdir -p "$before"; cp -r $(ls -A | grep -v '^\.') "$before"/
  cp -r .ab-before/. "$before"/
  (cd "$before" && PYTHONPATH=$before:$rest $BENCH --sizes 410M --seq 2048 --micro-batch 8 --baselines= \
    --out "$OUT/410M_before.json" --markdown | grep "^| 410M" || true)
  $BENCH --sizes 410M --seq 2048 --micro-batch 8 --baselines= --out "$OUT/$1.json" --markdown | grep "^| 410M" || true
}
BENCH="python3 tools/bench/bench_throughput.py --steps 10 --warmup 3"
stage=${1:-help}
case "$stage" in mlp-*|profile-410m-mlp|gemm-quack|optimizer*|rotary|ab-410m|llama|sizes) need_cute "$stage" ;; esac
case "$stage" in
  llama-2k)   # ~3 min: the llama-1B shape at 2048 x 8, ours (gradient sums freed between steps, the default, and kept) beside torchtitan
    setup; $BENCH --sizes llama-1B --seq 2048 --micro-batch 8 --baselines torchtitan \
      --set checkpoint_activations=false --variant "default:" --variant "kept: free_grad_sums_between_steps=false" \
      --out "$OUT/llama1B_2k.json" --markdown ;;
  llama-8k)   # ~3 min: the same at 8192 x 2 (FA4 chosen by default when .cute-* was installed)
    setup; $BENCH --sizes llama-1B --seq 8192 --micro-batch 2 --baselines torchtitan \
      --set checkpoint_activations=false --variant "default:" --variant "kept: free_grad_sums_between_steps=false" \
      --out "$OUT/llama1B_8k.json" --markdown ;;
  410m)   # ~3 min: 410M at 2048 x 8, the shipped file against HF eager (the 1.75x and 200k tokens/s targets)
    setup; $BENCH --sizes 410M --seq 2048 --micro-batch 8 --baselines eager \
      --variant "default:" --variant "kept: free_grad_sums_between_steps=false" --out "$OUT/410M.json" --markdown ;;
  1.3b)   # ~3 min: 1.3B at 2048 x 12, no checkpointing (the 62% MFU target)
    setup; $BENCH --sizes 1.3B --seq 2048 --micro-batch 12 --baselines= --set checkpoint_activations=false \
      --variant "default:" --variant "kept: free_grad_sums_between_steps=false" --out "$OUT/1-3B.json" --markdown ;;
  profile-410m)   # ~2 min: where the 410M step goes (kernel categories, top kernels, host time)
    setup; $BENCH --sizes 410M --seq 2048 --micro-batch 8 --baselines= --profile --out "$OUT/410M_profile.json" ;;
  profile-410m-mlp)   # ~3 min, needs .cute-*: where the 410M step goes with the fused MLP (default) and mlp_impl=torch
    setup; $BENCH --sizes 410M --seq 2048 --micro-batch 8 --baselines= --profile --variant "default:" \
      --variant "torch: mlp_impl=torch" --out "$OUT/410M_profile_mlp.json" ;;
  floor)   # ~1 min, no wheels needed: the GEMM + attention floor of each target's step
    export PYTHONPATH=$PWD
    G="python3 tools/bench/bench_gemm.py --attention"
    $G --sizes llama-1B --seq 2048 --micro-batch 8 --out "$OUT/gemm_llama1B_2k.json" | tail -3
    $G --sizes llama-1B --seq 8192 --micro-batch 2 --out "$OUT/gemm_llama1B_8k.json" | tail -3
    $G --sizes 410M --seq 2048 --micro-batch 8 --out "$OUT/gemm_410M.json" | tail -3
    $G --sizes 1.3B --seq 2048 --micro-batch 12 --out "$OUT/gemm_1.3B.json" | tail -3 ;;
  mlp-epilogue)   # ~3 min, needs .cute-* (two commands, as for FA4): quack's activation-fused GEMM epilogues
    # against cuBLAS + one compiled elementwise kernel, per MLP layer (the fusion lever's first measurement)
    setup; E="python3 tools/bench/bench_mlp_epilogue.py --fused"
    $E --sizes 410M,llama-1B --seq 2048 --micro-batch 8 --out "$OUT/mlp_epilogue_mb8.json"
    $E --sizes 1.3B --seq 2048 --micro-batch 12 --out "$OUT/mlp_epilogue_1.3B.json" ;;
  mlp-quack)   # ~8 min, needs .cute-* (two commands, as for FA4): mlp_impl quack's GPU tests, the kernels against
    # cuBLAS + the compiled GELU per layer (also autotuned), then 410M with the default (quack chosen) and mlp_impl=torch
    setup; timeout 150 python3 -m pytest -m gpu tests/gpu/test_gpu_fused_mlp.py -q -x > "$OUT/pytest_fused_mlp.txt" 2>&1 || true
    tail -25 "$OUT/pytest_fused_mlp.txt"
    E="timeout 150 python3 tools/bench/bench_mlp_epilogue.py --fused"
    $E --sizes 410M,1.3B --seq 2048 --micro-batch 8 --out "$OUT/mlp_epilogue_gelu.json" > "$OUT/mlp_epilogue.txt" 2>&1 || true
    $E --sizes 410M --seq 2048 --micro-batch 8 --tuned --out "$OUT/mlp_epilogue_gelu_tuned.json" > "$OUT/mlp_epilogue_tuned.txt" 2>&1 || true
    grep -v "^\s*$" "$OUT/mlp_epilogue.txt" "$OUT/mlp_epilogue_tuned.txt" | tail -30 || true
    $BENCH --sizes 410M --seq 2048 --micro-batch 8 --baselines= --variant "default:" --variant "torch: mlp_impl=torch" \
      --out "$OUT/410M_mlp.json" --markdown ;;
  mlp-train)   # ~8 min, needs .cute-*: the fused MLP's GPU tests, then 410M (2048 x 8) with the default (mlp_impl
    # quack, autotuned), with quack's default tile configs, and with mlp_impl=torch, in one run
    setup; timeout 300 python3 -m pytest -m gpu tests/gpu/test_gpu_fused_mlp.py -q --durations=5 > "$OUT/pytest_fused_mlp.txt" 2>&1 || true
    grep -E "passed|failed|FAILED|Error" "$OUT/pytest_fused_mlp.txt" | tail -12 || true
    $BENCH --sizes 410M --seq 2048 --micro-batch 8 --baselines= --variant "default:" --variant "untuned: mlp_autotune=false" \
      --variant "torch: mlp_impl=torch" --out "$OUT/410M_mlp.json" --markdown | grep "^| 410M" || true ;;
  mlp-train-1.3b)   # ~6 min, needs .cute-*: 1.3B (2048 x 12) with the default (mlp_impl quack, autotuned), with
    # quack's default tile configs and with mlp_impl=torch (the 62% MFU target)
    setup; $BENCH --sizes 1.3B --seq 2048 --micro-batch 12 --baselines= --set checkpoint_activations=false \
      --variant "default:" --variant "untuned: mlp_autotune=false" --variant "torch: mlp_impl=torch" \
      --out "$OUT/1-3B_mlp.json" --markdown | grep "^| 1.3B" || true ;;
  mlp-train-llama)   # ~5 min, needs .cute-* (and .whl-tt for the peer): the llama-1B shape at 2048 x 8 with the fused
    # SwiGLU (the default: mlp_impl quack, autotuned), with quack's default tile configs and with mlp_impl=torch,
    # beside torchtitan; then the SwiGLU kernels alone (bench_mlp_epilogue)
    setup; $BENCH --sizes llama-1B --seq 2048 --micro-batch 8 --baselines torchtitan --set checkpoint_activations=false \
      --variant "default:" --variant "untuned: mlp_autotune=false" --variant "torch: mlp_impl=torch" \
      --out "$OUT/llama1B_2k_mlp.json" --markdown | grep "^| llama" || true
    timeout 120 python3 tools/bench/bench_mlp_epilogue.py --fused --sizes llama-1B --seq 2048 --micro-batch 8 \
      --out "$OUT/mlp_epilogue_swiglu.json" | grep -v "^\s*$" | tail -6 || true ;;
  mlp-tests)   # ~4 min, needs .cute-*: the fused MLP's GPU tests, the autotuned cases last (each tunes afresh)
    setup; timeout 160 python3 -m pytest -m gpu tests/gpu/test_gpu_fused_mlp.py -q -k "not tuned" --durations=8 \
      > "$OUT/pytest_fused_mlp.txt" 2>&1 || true
    tail -14 "$OUT/pytest_fused_mlp.txt"
    # each call's host cost (is the quack forward what makes the 410M forward host-bound?)
    timeout 60 python3 tools/bench/bench_mlp_epilogue.py --fused --sizes 410M --host-tokens 256 --host-only \
      --out "$OUT/mlp_host_410M.json" 2>&1 | tail -2 || true
    timeout 120 python3 tools/bench/bench_mlp_epilogue.py --fused --tuned --sizes 410M --host-tokens 256 --host-only \
      --out "$OUT/mlp_host_410M_tuned.json" 2>&1 | tail -2 || true   # the autotuned path's lookup per call
    timeout 70 python3 -m pytest -m gpu tests/gpu/test_gpu_fused_mlp.py -q -k "tuned" --durations=3 \
      > "$OUT/pytest_fused_mlp_tuned.txt" 2>&1 || true
    tail -8 "$OUT/pytest_fused_mlp_tuned.txt" ;;
  mlp-tests-tuned)   # ~8 min, needs .cute-*: only the autotuned cases of the fused MLP's GPU tests (each tunes its
    # shapes afresh on a new machine, more than 45 s a shape: too long to follow the other tests in one call)
    setup; timeout 540 python3 -m pytest -m gpu tests/gpu/test_gpu_fused_mlp.py -q -k "tuned" --durations=8 \
      > "$OUT/pytest_fused_mlp_tuned.txt" 2>&1 || true
    tail -14 "$OUT/pytest_fused_mlp_tuned.txt" ;;
  mlp-host)   # ~4 min, needs .cute-*: why the 410M forward's host span grew with the fused MLP (22.8 -> 34.8 ms,
    # 2026-12-02): host syncs (torch's sync-debug mode) and the profile, default (autotuned) / untuned / torch
    setup; $BENCH --sizes 410M --seq 2048 --micro-batch 8 --baselines= --sync-debug --profile --variant "default:" \
      --variant "untuned: mlp_autotune=false" --variant "torch: mlp_impl=torch" --out "$OUT/410M_mlp_host.json" --markdown \
      2>&1 | grep -E "phases|forward|backward|  step|sync|^\| 410M" | tail -30 || true ;;
  gemm-quack)   # ~5 min, needs .cute-*: every GEMM of a 1.3B (2048 x 12) and a llama-1B (2048 x 8) step on cuBLAS and
    # on quack's autotuned GEMM (is quack the faster GEMM on these shapes?)
    setup; G="timeout 270 python3 tools/bench/bench_gemm.py --quack"
    $G --sizes 1.3B --seq 2048 --micro-batch 12 --out "$OUT/gemm_quack_1.3B.json" | tail -22 || true
    $G --sizes llama-1B --seq 2048 --micro-batch 8 --out "$OUT/gemm_quack_llama1B.json" | tail -22 || true ;;
  optimizer)   # ~6 min, needs .cute-* (the MLP default): fused_optimizer_step's GPU tests, the step alone (torch's
    # fused AdamW + the bf16 copy against the one Triton kernel) at three sizes, then 410M default / unfused step
    setup; timeout 150 python3 -m pytest -m gpu tests/gpu/test_gpu_fused_adamw.py -q > "$OUT/pytest_fused_adamw.txt" 2>&1 || true
    tail -6 "$OUT/pytest_fused_adamw.txt"
    timeout 90 python3 tools/bench/bench_optimizer.py --sizes 410M,1.3B,llama-1B --out "$OUT/optimizer_step.json" || true
    $BENCH --sizes 410M --seq 2048 --micro-batch 8 --baselines= --variant "default:" \
      --variant "torch-step: fused_optimizer_step=false" --out "$OUT/410M_fused_step.json" --markdown | grep "^| 410M" || true ;;
  optimizer-1.3b)   # ~5 min, needs .cute-*: 1.3B (2048 x 12) default / unfused step (the 62% MFU target)
    setup; $BENCH --sizes 1.3B --seq 2048 --micro-batch 12 --baselines= --set checkpoint_activations=false \
      --variant "default:" --variant "torch-step: fused_optimizer_step=false" --out "$OUT/1-3B_fused_step.json" \
      --markdown | grep "^| 1.3B" || true ;;
  graphs)   # ~5 min, needs .cute-*: torch_compile_mode reduce-overhead (each layer replayed as CUDA graphs): its GPU
    # test, then 410M (2048 x 8) default / graphs, profiled (device-only traces: where the host still leaves the GPU idle)
    setup; timeout 120 python3 -m pytest -m gpu tests/gpu/test_gpu_cudagraphs.py -q > "$OUT/pytest_cudagraphs.txt" 2>&1 || true
    tail -4 "$OUT/pytest_cudagraphs.txt"
    $BENCH --sizes 410M --seq 2048 --micro-batch 8 --baselines= --profile --variant "default:" \
      --variant "graphs: torch_compile_mode=reduce-overhead" --out "$OUT/410M_graphs.json" --markdown \
      | grep -v "^    " || true ;;
  optimizer-direct)   # ~4 min, needs .cute-*: the step alone with the bf16 gradients read in place (bf16_optimizer_patches
    # item 6) against the fold + fused kernel, then 410M (2048 x 8) default / torch's step, profiled
    setup; timeout 120 python3 tools/bench/bench_optimizer.py --sizes 410M,llama-1B --out "$OUT/optimizer_direct.json" || true
    $BENCH --sizes 410M --seq 2048 --micro-batch 8 --baselines= --profile --variant "default:" \
      --variant "torch-step: fused_optimizer_step=false" --out "$OUT/410M_direct.json" --markdown \
      | grep -E "^\| 410M|optimizer|adamw|device time|idle" || true ;;
  optimizer-tests)   # ~5 min, needs .cute-* (the MLP default): fused_optimizer_step's GPU tests (the trainer's
    # bit-for-bit resume included)
    setup; timeout 420 python3 -m pytest -m gpu tests/gpu/test_gpu_fused_adamw.py -q > "$OUT/pytest_fused_adamw.txt" 2>&1 || true
    tail -15 "$OUT/pytest_fused_adamw.txt" ;;
  rotary)   # ~8 min, needs .cute-* and .ab-before (carried): the rotary tables' GPU test, then 410M (2048 x 8) with
    # the code before them (the files under .ab-before/ laid over a copy of this tree: the caller fills it with
    # `git show REV:path`) and with this tree, in one call; then this tree profiled, with the memsets' launch sites
    setup; timeout 120 python3 -m pytest -m gpu tests/gpu/test_gpu_numerics.py -q > "$OUT/pytest_numerics.txt" 2>&1 || true
    tail -4 "$OUT/pytest_numerics.txt"
    before_and_after_410m 410M_rotary
    $BENCH --sizes 410M --seq 2048 --micro-batch 8 --baselines= --steps 5 --profile --launch-sites "Memset" \
      --out "$OUT/410M_rotary_profile.json" | grep -v "^    [0-9 ]*\.[0-9]* ms own" || true ;;
  ab-410m)   # ~4 min, needs .cute-* and .ab-before (carried): 410M (2048 x 8) with the files under .ab-before/ laid
    # over a copy of this tree (the code before a change: the caller fills it with `git show REV:path`), then with
    # this tree, in one call
    setup; before_and_after_410m 410M_after ;;
  llama)   # ~7 min, needs .cute-* and .whl-tt: the llama-1B shape at 2048 x 8 and at 8192 x 2, ours (the default) beside
    # torchtitan (the first target, both sequence lengths in one call)
    setup; $BENCH --sizes llama-1B --seq 2048 --micro-batch 8 --baselines torchtitan --set checkpoint_activations=false \
      --out "$OUT/llama1B_2k.json" --markdown | grep "^| llama" || true
    $BENCH --sizes llama-1B --seq 8192 --micro-batch 2 --baselines torchtitan --set checkpoint_activations=false \
      --out "$OUT/llama1B_8k.json" --markdown | grep "^| llama" || true ;;
  sizes)   # ~7 min, needs .cute-*: 410M (2048 x 8) beside HF eager, and 1.3B (2048 x 12, no checkpointing): the
    # 200k tokens/s, 1.75x and 62% MFU targets
    setup; $BENCH --sizes 410M --seq 2048 --micro-batch 8 --baselines eager --out "$OUT/410M.json" --markdown \
      | grep "^| 410M" || true
    $BENCH --sizes 1.3B --seq 2048 --micro-batch 12 --baselines= --set checkpoint_activations=false \
      --out "$OUT/1-3B.json" --markdown | grep "^| 1.3B" || true ;;
  gpu-tests)   # ~2 min: the GPU tests of the throughput paths (freed sums, multi-tensor add, compiled vs eager)
    setup; python3 -m pytest -m gpu tests/gpu/test_gpu_free_grad_sums.py tests/gpu/test_gpu_multi_tensor_add.py \
      -q 2>&1 | tail -15 ;;
  *) sed -n '2,10p' "$0"; echo "stages: llama-2k llama-8k 410m 1.3b profile-410m profile-410m-mlp floor mlp-epilogue mlp-quack mlp-train mlp-train-1.3b mlp-train-llama mlp-tests mlp-tests-tuned mlp-host gemm-quack optimizer optimizer-1.3b graphs optimizer-direct optimizer-tests rotary ab-410m llama sizes gpu-tests" ;;
esac
