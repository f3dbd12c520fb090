"""Workers for tests/distributed/test_pipeline.py: tiny GPT models trained through our engine and step
functions, at PP=1 (the reference, one process) and at PP > 1 (gloo, 4 processes), from the same seed
(so the same initial weights: layout-independent init) and the same global batches.

Data: sample i of the run is a fixed random sequence (generator seeded by i). Step t reads samples
[t*B, (t+1)*B) (B = global batch); data-parallel rank d's micro-batch m takes b of them. Every loss mask
is one, so the step's loss and gradient (means over the global batch's tokens) do not depend on how the
batch is cut into micro-batches and data-parallel ranks: PP=1 with grad_acc G x dp and PP>1 with grad_acc
G see the same function of the same samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

VOCAB = 128
SEQ = 16
MICRO = 2
GLOBAL_BATCH = 8
STEPS = 4
SEED = 1234

BASE = {
    "num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "seq_length": SEQ,
    "max_position_embeddings": SEQ, "make_vocab_size_divisible_by": 64, "hidden_dropout": 0.0,
    "attention_dropout": 0.0, "train_micro_batch_size_per_gpu": MICRO, "train_batch_size": GLOBAL_BATCH,
    "train_iters": STEPS, "lr_decay_iters": 8, "warmup": 0.25, "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8}},
    "weight_decay": 0.01, "data_path": "data/bundled/pystdlib_text_document", "seed": SEED,
    "tokenizer_type": "ByteLevelTokenizer",
    # what these checks were written with before the defaults became GPT-NeoX's
    "pos_emb": "rotary", "init_method": "small_init", "output_layer_init_method": "wang_init",
    "lr_decay_style": "cosine", "rms_norm_epsilon": 1.0e-6,
}

# the variants of the issue, each run at PP=1 and at its layout (pp, tp, dp) on 4 processes
VARIANTS = {
    # rotary, parallel residual (gpt_j_residual), layernorm, untied head, fused cross entropy
    "pp4": ({"pipe_parallel_size": 4, "pos_emb": "rotary", "gpt_j_residual": True, "no_weight_tying": True},
            (4, 1, 1)),
    # Llama blocks (rmsnorm, swiglu, rotary), untied head, the vocab-parallel (unfused) cross entropy,
    # stages balanced by parameter count
    "pp2_tp2_llama": ({"pipe_parallel_size": 2, "model_parallel_size": 2, "norm": "rmsnorm", "activation": "swiglu",
                       "intermediate_size": 768,  # GPT-NeoX's 3x convention: a 256-wide SwiGLU
                       "pipe_partition_method": "parameters",
                       "pos_emb": "rotary", "no_weight_tying": True, "fused_cross_entropy": False,
                       "use_bias_in_attn_linear": False, "use_bias_in_mlp": False}, (2, 2, 1)),
    # sequence parallelism, learned positions, sequential residual, tied embeddings across the stages
    "pp2_tp2_sp_tied": ({"pipe_parallel_size": 2, "model_parallel_size": 2, "sequence_parallel": True,
                         "pos_emb": "learned"}, (2, 2, 1)),
    # tied embeddings, ZeRO-1 over 2 data-parallel replicas, activation checkpointing in the stages, the
    # specs cut uniformly
    "pp2_dp2_zero1_tied": ({"pipe_parallel_size": 2, "zero_optimization": {"stage": 1},
                            "pipe_partition_method": "uniform",
                            "checkpoint_activations": True, "checkpoint_num_layers": 1}, (2, 1, 2)),
    # no clipping: the fp32 norm is then measured before DeepSpeed's model step (engine/steps.py)
    "pp2_dp2_noclip": ({"pipe_parallel_size": 2, "gradient_clipping": 0.0, "no_weight_tying": True}, (2, 1, 2)),
    # bf16 weights, fp32 gradient sums, ZeRO-1: DeepSpeed's BF16_Optimizer (with bf16_optimizer_patches)
    "pp2_dp2_bf16": ({"pipe_parallel_size": 2, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                      "data_types": {"grad_accum_dtype": "fp32"}}, (2, 1, 2)),
}
BF16_VARIANTS = ("pp2_dp2_bf16",)  # (fp16: DeepSpeed refuses it on CPU; tests/gpu/test_gpu_pipeline.py)


def init_deepspeed_comm() -> None:
    """deepspeed.comm over the gloo group the test harness started (what engine.distributed does in a run)."""
    import deepspeed

    deepspeed.comm.init_distributed(dist_backend="gloo", verbose=False)


def make_args(overrides: dict, world_size: int):
    from megatron.neox_args import NeoXArgs

    args = NeoXArgs.from_dict({**BASE, **overrides}, world_size=world_size)
    args.set_vocab_size(VOCAB)
    return args


def sample(index: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10_000 + index)
    return torch.randint(0, VOCAB, (SEQ + 1,), generator=generator)


def batches(dp_rank: int, dp_size: int, grad_acc: int, start_step: int = 0):
    """This data-parallel rank's micro-batches, step after step (see the module docstring)."""
    step = start_step
    while True:
        for micro in range(grad_acc):
            first = step * GLOBAL_BATCH + (micro * dp_size + dp_rank) * MICRO
            seqs = torch.stack([sample(first + k) for k in range(MICRO)])  # [b, s + 1]
            yield {"tokens": seqs[:, :-1].contiguous(), "labels": seqs[:, 1:].contiguous(),
                   "loss_mask": torch.ones(MICRO, SEQ)}
        step += 1


def build(args, parallel):
    """(engine, step function, module) for `args` on `parallel`, built as train.py builds them: the initial
    weights come from the seed and each weight's global name, whatever the layout (megatron/model/init.py)."""
    from megatron.engine import build_engine
    from megatron.engine.steps import EngineStep
    from megatron.mpu.random import model_parallel_seed
    from megatron.training.setup import build_model, build_step

    model_parallel_seed(SEED, parallel)
    model, sum_sp = build_model(args, parallel, "cpu")
    engine = build_engine(args, model, "cpu", parallel)
    step = build_step(args, model, parallel) or EngineStep(model, parallel, args.derived.gradient_accumulation_steps,
                                                           sum_sequence_parallel_grads=sum_sp)
    return engine, step, model


def train(args, parallel, steps: int = STEPS, check_tied=False):
    """[(loss, grad norm)] per step, as the trainer logs them (dp mean of the loss)."""
    from megatron.mpu.reductions import data_parallel_mean

    engine, step, module = build(args, parallel)
    data = batches(parallel.dp_rank, parallel.dp_size, args.derived.gradient_accumulation_steps)
    records = []
    for _ in range(steps):
        loss_sum, count = step.train(engine, data, measure_grad_norm=True)
        records.append((data_parallel_mean(loss_sum / count, parallel), step.grad_norm(engine)))
        if check_tied:
            assert_tied_copies_identical(module, parallel)
    return records


def assert_tied_copies_identical(module, parallel) -> None:
    """The word-embedding weight of the first stage and its copy on the last stage are bit-identical."""
    from megatron.model.pipeline import TIED_KEY

    weight = module.tied_modules[TIED_KEY].word_embeddings.weight.detach()
    gathered = [torch.empty_like(weight) for _ in range(parallel.pp_size)]
    dist.all_gather(gathered, weight.contiguous(), group=parallel.pp_group)
    assert torch.equal(gathered[0], gathered[-1]), "the tied embedding copies differ"


def reference_runs(rank, world_size, names):
    """PP=1, TP=1 on one process: {variant: [(loss, grad norm)]}."""
    from megatron.mpu import initialize_model_parallel

    init_deepspeed_comm()
    results = {}
    for name in names:
        overrides = dict(VARIANTS[name][0], pipe_parallel_size=1, model_parallel_size=1, sequence_parallel=False)
        args = make_args(overrides, world_size=1)
        results[name] = train(args, initialize_model_parallel(1, 1))
    return results


def pipeline_runs(rank, world_size, names):
    """Every variant at its layout on `world_size` processes: {variant: [(loss, grad norm)]} per rank."""
    from megatron.mpu import initialize_model_parallel

    init_deepspeed_comm()
    results = {}
    for name in names:
        overrides, (pp, tp, dp) = VARIANTS[name]
        args = make_args(overrides, world_size=world_size)
        parallel = initialize_model_parallel(tp, pp, sequence_parallel=args.parallel.sequence_parallel)
        assert (parallel.pp_size, parallel.tp_size, parallel.dp_size) == (pp, tp, dp)
        results[name] = train(args, parallel, check_tied=not args.model.no_weight_tying)
    return results


# --- checkpoints: save, keep-last-N, exact resume, finetune across layouts, reshard, HF ------------------

CKPT = {"no_weight_tying": True, "pos_emb": "rotary", "keep_last_n_checkpoints": 2}
CKPT_STEPS = 4
FINETUNE_STEPS = 2


def _finetune(overrides: dict, load: str, world_size: int, tp: int, pp: int):
    """Fresh engine at (tp, pp), weights from checkpoint `load` (finetune), FINETUNE_STEPS on the batches
    after step CKPT_STEPS; [(loss, grad norm)]."""
    from megatron.checkpointing.resume import load_checkpoint
    from megatron.mpu import initialize_model_parallel
    from megatron.mpu.reductions import data_parallel_mean

    args = make_args({**CKPT, **overrides, "load": load, "finetune": True, "model_parallel_size": tp,
                      "pipe_parallel_size": pp}, world_size)
    parallel = initialize_model_parallel(tp, pp)
    engine, step, _ = build(args, parallel)
    progress = load_checkpoint(engine, args)
    assert progress.iteration == 0
    data = batches(parallel.dp_rank, parallel.dp_size, args.derived.gradient_accumulation_steps, CKPT_STEPS)
    records = []
    for _ in range(FINETUNE_STEPS):
        loss_sum, count = step.train(engine, data, measure_grad_norm=True)
        records.append((data_parallel_mean(loss_sum / count, parallel), step.grad_norm(engine)))
    return records


def checkpoint_runs(rank, world_size, save_dir):
    """PP=2 x TP=2 on 4 processes: train CKPT_STEPS saving after steps 2, 3, 4 (keep_last_n 2); resume from
    step 3 and train step 4 again; finetune from step 4 at PP=2 x TP=2, at PP=1 x TP=2 x DP=2, and at
    PP=2 x TP=2 from its weights-only copy written by tools/ckpts/reshard.py."""
    from megatron.checkpointing.layout import complete_tags, write_latest
    from megatron.checkpointing.resume import TrainProgress, load_checkpoint, save_checkpoint
    from megatron.mpu import initialize_model_parallel
    from megatron.mpu.reductions import data_parallel_mean

    init_deepspeed_comm()
    args = make_args({**CKPT, "pipe_parallel_size": 2, "model_parallel_size": 2, "save": save_dir,
                      "load": save_dir}, world_size)
    parallel = initialize_model_parallel(2, 2)
    engine, step, _ = build(args, parallel)
    data = batches(parallel.dp_rank, parallel.dp_size, args.derived.gradient_accumulation_steps)
    progress, losses = TrainProgress(), []
    for iteration in range(1, CKPT_STEPS + 1):
        loss_sum, count = step.train(engine, data)
        losses.append(data_parallel_mean(loss_sum / count, parallel))
        progress.iteration, progress.consumed_train_samples = iteration, iteration * GLOBAL_BATCH
        if iteration >= 2:
            save_checkpoint(engine, args, progress)
    tags = complete_tags(save_dir)

    if rank == 0:
        write_latest(save_dir, "global_step3")
    dist.barrier()
    engine, step, _ = build(args, parallel)
    resumed = load_checkpoint(engine, args)
    data = batches(parallel.dp_rank, parallel.dp_size, args.derived.gradient_accumulation_steps, resumed.iteration)
    loss_sum, count = step.train(engine, data)
    resumed_loss = data_parallel_mean(loss_sum / count, parallel)
    dist.barrier()
    if rank == 0:
        write_latest(save_dir, "global_step4")
        # the same layout written by tools/ckpts/reshard.py (weights only): DeepSpeed's own module-only load
        _reshard_tool().reshard(save_dir, save_dir + "_weights", model_parallel_size=2, pipe_parallel_size=2)
    dist.barrier()
    return {"losses": losses, "tags": tags, "resumed_iteration": resumed.iteration, "resumed_loss": resumed_loss,
            "finetune_pp2": _finetune({}, save_dir, world_size, tp=2, pp=2),
            "finetune_pp1_tp2": _finetune({}, save_dir, world_size, tp=2, pp=1),
            "finetune_pp2_weights_only": _finetune({}, save_dir + "_weights", world_size, tp=2, pp=2)}


def _reshard_tool():
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("reshard_tool", os.path.join(root, "tools", "ckpts", "reshard.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def reference_checkpoint_runs(rank, world_size, save_dir, reshard_dir, probe_tokens):
    """PP=1 on one process: the losses of CKPT_STEPS steps and the logits of `probe_tokens` after them;
    the PP=2 x TP=2 checkpoint resharded to PP=1 x TP=1 (tools/ckpts/reshard.py) and finetuned."""
    from megatron.mpu import initialize_model_parallel
    from megatron.mpu.reductions import data_parallel_mean

    init_deepspeed_comm()
    args = make_args({**CKPT, "pipe_parallel_size": 1}, world_size)
    parallel = initialize_model_parallel(1, 1)
    engine, step, model = build(args, parallel)
    data = batches(0, 1, args.derived.gradient_accumulation_steps)
    losses = []
    for _ in range(CKPT_STEPS):
        loss_sum, count = step.train(engine, data)
        losses.append(data_parallel_mean(loss_sum / count, parallel))
    with torch.no_grad():
        model.eval()
        logits = model(probe_tokens).float()  # [b, s, padded vocab] (TP=1: the whole vocabulary)

    _reshard_tool().reshard(save_dir, reshard_dir, model_parallel_size=1, pipe_parallel_size=1)
    return {"losses": losses, "logits": logits,
            "finetune_resharded": _finetune({}, reshard_dir, world_size, tp=1, pp=1)}
