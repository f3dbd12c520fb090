#!/usr/bin/env bash
# Long-sequence measurements on ONE H200 (issue 16), in stages: each stage is one command of the GPU
# machine (<= 10 min), printed with its expected duration. Run from the repository root:
#   bash tools/bench/long_seq_gpu.sh STAGE
# Setup on the GPU machine (torch 2.11 + CUDA 13, no internet; wheels made here beforehand):
#   bash ../shared/gpu/make-wheels.sh && bash ../shared/gpu/make-cute-wheels.sh     (on the CPU machine, once)
#   command 1, carrying .cute-a:   cp -r .cute-a /tmp/cute-a
#   command 2, carrying .whl and .cute-b (within ~30 s):  bash tools/bench/long_seq_gpu.sh <stage>
# Every stage installs the wheels itself (fast when already there) and writes JSON/logs under $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/long_seq_out}; mkdir -p "$OUT"
setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  if [ -d .cute-b ]; then source .cute-b/install-cute.sh; fi
  export PYTHONPATH=$PWD:/tmp/site${CUTE_PATH:+:$CUTE_PATH}
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | head -2
}
BENCH="python3 tools/bench/bench_throughput.py --baselines= --micro-batch 1 --timing events"
FAST="--set torch_compile=true"
stage=${1:-help}
case "$stage" in
  tests)   # ~3 min (FA4 compiles its kernels on first use): numerics of FA4 / varlen / offload / kept attention
    setup; python3 -m pytest -m gpu tests/gpu/test_gpu_long_seq.py -q -x 2>&1 | tail -20 ;;
  keep-tests)   # ~2 min: the model paths the attention refactor touched (FA4 vs SDPA, kept attention)
    setup; python3 -m pytest -m gpu tests/gpu/test_gpu_long_seq.py -q -k "keep_attention or model_with_fa4" 2>&1 | tail -20 ;;
  attention)   # ~2 min: FA4 vs cuDNN (and torch varlen) per shape, fwd+bwd causal bf16
    setup; python3 tools/bench/bench_attention.py --head-dims 64,128 --seqs 2048,8192,32768,131072 \
      --kernels fa4,cudnn,varlen --tokens 131072 --warmup 2 --iters 5 --out "$OUT/attention.json" ;;
  1.3b-128k)   # ~4 min: 1.3B at 131072 with FA4, plain full checkpointing vs checkpoint_keep_attention
    setup; $BENCH --sizes 1.3B --seq 131072 --steps 2 --warmup 1 $FAST --timeout 280 \
      --variant "fa4: attention_impl=fa4" --variant "fa4-keep: attention_impl=fa4 checkpoint_keep_attention=true" \
      --out "$OUT/1-3B-128k.json" --markdown ;;
  6.9b-128k)   # ~5 min: 6.9B at 131072 on one GPU, configs/long_seq/6-9B-128k.yml as shipped: optimizer on the
               # device (BF16_Optimizer, ZeRO-1, bf16.immediate_grad_update), the checkpointed layer inputs in
               # pinned host memory, MLP in 16k chunks, FA4. (ZeRO-2 + CPU Adam was killed on the 125 GiB host:
               # memory_check now refuses it there.)
    setup; $BENCH --sizes configs/long_seq/6-9B-128k.yml --seq 131072 --steps 1 --warmup 1 \
      --out "$OUT/6-9B-128k.json" --markdown --timeout 560 ;;
  1.3b-512k)   # ~8 min (one step is ~3.5 min at 512k): 1.3B at 524288, FA4, MLP in 64k chunks
    setup; $BENCH --sizes 1.3B --seq 524288 --steps 1 --warmup 1 $FAST --set attention_impl=fa4 \
      --set mlp_chunk_size=65536 --out "$OUT/1-3B-512k.json" --markdown --timeout 590 ;;
  2.7b-256k)   # ~6 min (one step ~103 s): the 2.7B row of the max-sequence table (measured 2026-12-01)
    setup; $BENCH --sizes 2.7B --seq 262144 --steps 1 --warmup 1 $FAST --set attention_impl=fa4 --set mlp_chunk_size=65536 \
      --out "$OUT/2-7B-256k.json" --markdown --timeout 380 ;;
  410m-1m)   # ~8 min: the 410M row at 1048576 (the estimate's longest fitting power of two, 85 GiB). One step
             # takes ~6 min, so this one is timed WITHOUT a warm-up step: its time includes compiling the layers
             # (~1 min); say so where it is recorded. The 410M config has no checkpointing: turned on.
    setup; $BENCH --sizes 410M --seq 1048576 --steps 1 --warmup 0 $FAST --set checkpoint_activations=true \
      --set attention_impl=fa4 --set mlp_chunk_size=65536 --out "$OUT/410M-1M.json" --markdown --timeout 560 ;;
  estimate)  # seconds, CPU only: the estimate of every row, to pick the lengths
    for s in 131072 262144 524288 1048576; do for z in 410M:configs/410M.yml 1.3B:configs/1-3B.yml 2.7B:configs/2-7B.yml; do
      echo "== ${z%%:*} seq $s"; python3 -m megatron.training.memory_estimate "${z#*:}" configs/local_setup.yml \
        --world-size 1 --set seq_length=$s --set max_position_embeddings=$s --set train_micro_batch_size_per_gpu=1 \
        --set gradient_accumulation_steps=1 --set torch_compile=true --set mlp_chunk_size=65536 --set checkpoint_activations=true --device-gib 139 | grep "^device\|^refused" | cut -c1-60
    done; done ;;
  *) sed -n '2,9p' "$0"; echo "stages: tests keep-tests attention 1.3b-128k 6.9b-128k 1.3b-512k 2.7b-256k 410m-1m estimate" ;;
esac
