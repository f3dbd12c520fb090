"""The typed sections of NeoXArgs: every YAML key the user may write is a field here.

YAML is flat: each key names exactly one field of one section (field names are unique across sections).
Dashes and underscores are the same (`train-iters` == `train_iters`). Each field has a docstring right
under it; `docs/CONFIG.md` is generated from them (`python -m megatron.neox_args.docs`).

Values computed from these (data-parallel size, padded vocab, ...) live in `DerivedArgs`, never here:
a section holds exactly what the user wrote, or the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ModelArgs:
    """Shape and architecture of the decoder (GPT-NeoX and Llama families)."""

    num_layers: int = 2
    """Number of transformer layers."""

    hidden_size: int = 128
    """Width of the residual stream (h)."""

    num_attention_heads: int = 4
    """Number of query heads; must divide hidden_size."""

    num_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; None means num_attention_heads (plain multi-head)."""

    intermediate_size: Optional[int] = None
    """MLP inner size with GPT-NeoX's meaning; None means 4*h. For gelu/relu/silu it is the MLP width
    (rounded up to mlp_multiple_of). For the gated swiglu it is 3x the real width, as upstream counts it:
    width = ceil((int(I * 2/3) // 2) / m) * m with m = mlp_multiple_of (Llama-2 7B: I = 32768, m = 256 gives
    11008); with no intermediate_size a swiglu MLP is therefore 4h/3 wide. The resolved width is
    derived.intermediate_size."""

    mlp_multiple_of: int = 1
    """Round the MLP width up to a multiple of this (GPT-NeoX's key; Llama configs use 256). For swiglu the
    fused gate+up size int(I * 2/3) is rounded up to 2 * mlp_multiple_of and must equal twice the width;
    settings where upstream's two roundings disagree (and upstream's model would fail) are refused."""

    seq_length: int = 128
    """Training sequence length in tokens."""

    max_position_embeddings: Optional[int] = None
    """Longest position the model supports; None means seq_length. Must be >= seq_length."""

    pos_emb: Literal["rotary", "learned", "none"] = "learned"
    """Position embedding: rotary (RoPE), learned absolute, or none."""

    rotary_pct: float = 1.0
    """Fraction of each head's dimensions that rotary acts on (Pythia uses 0.25)."""

    rotary_emb_base: int = 10000
    """Rotary base (theta)."""

    gpt_j_residual: bool = False
    """Parallel residual (GPT-J / GPT-NeoX): x + attn(ln1(x)) + mlp(ln2(x)) instead of sequential."""

    no_weight_tying: bool = False
    """Untie the input embedding and the output projection (GPT-NeoX: true for Pythia)."""

    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalization layer."""

    layernorm_epsilon: float = 1.0e-5
    """Epsilon of LayerNorm."""

    rms_norm_epsilon: float = 1.0e-8
    """Epsilon of RMSNorm (GPT-NeoX's default 1e-8; Llama checkpoints use 1e-5 or 1e-6)."""

    use_bias_in_norms: bool = True
    """LayerNorm has a bias (ignored for RMSNorm, which never has one)."""

    use_bias_in_attn_linear: bool = True
    """Attention QKV and output projections have biases."""

    use_bias_in_mlp: bool = True
    """MLP projections have biases."""

    activation: Literal["gelu", "relu", "silu", "swish", "softsign", "mish", "swiglu", "geglu", "reglu",
                        "bilinear", "glu"] = "gelu"
    """MLP activation, GPT-NeoX's list: gelu (exact, erf), relu, silu = swish, softsign, mish; or gated,
    act(gate(x)) * up(x): swiglu (silu, Llama), geglu (exact gelu), reglu (relu), bilinear (identity), glu
    (sigmoid). Gated MLPs follow upstream's width rule (intermediate_size counts 3x)."""

    bias_gelu_fusion: bool = False
    """GPT-NeoX's key: true makes `activation: gelu` the tanh approximation
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (what upstream's fused bias+GELU kernel computes, HF's
    `gelu_new`); false is the exact erf GELU. No effect on other activations."""

    init_method: Literal["normal", "scaled_normal", "single_residual_scaled_normal", "small_init",
                         "wang_init"] = "normal"
    """Init of input-side weights (QKV, fc1, embedding): normal(init_method_std), scaled_normal
    (std = init_method_std / sqrt(2L)), single_residual_scaled_normal (init_method_std / sqrt(L)),
    small_init (std = sqrt(2/(5h)), Nguyen & Salazar 2019) or wang_init (std = 2/(L*sqrt(h))).
    GPT-NeoX's default: normal."""

    output_layer_init_method: Literal["normal", "scaled_normal", "single_residual_scaled_normal", "small_init",
                                      "wang_init"] = "scaled_normal"
    """Init of output-side weights (attention out, fc2): the same choices; GPT-NeoX's default scaled_normal
    (std = init_method_std / sqrt(2L))."""

    init_method_std: float = 0.02
    """Standard deviation for the normal and scaled_normal inits."""

    hidden_dropout: float = 0.0
    """Dropout on the residual branches."""

    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""

    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times model_parallel_size (for speed and even TP shards)."""

    attention_impl: Optional[Literal["sdpa", "flash", "fa4"]] = None
    """Attention kernel. null (the default) chooses for the device at start: `fa4` on Hopper where it was
    measured faster than cuDNN (head size 64 or 128, seq_length >= 8192, bf16/fp16, no attention dropout,
    flash_attn.cute installed; megatron/training/device_defaults.py), else `sdpa`. `sdpa`, torch scaled_dot_product_attention (picks flash/cuDNN/efficient itself; with
    document masking or a sliding window, torch's varlen_attn on CUDA and per-document SDPA on CPU); `flash`,
    the flash-attn 2 package; `fa4`, FlashAttention-4 (`flash_attn.cute`, pip package flash-attn-4; CUDA,
    Hopper or Blackwell, bf16/fp16, head size a multiple of 8 up to 256 (128 on Blackwell), no attention
    dropout). A missing package is a config error naming it."""

    mlp_impl: Optional[Literal["torch", "quack"]] = None
    """MLP kernels. `torch`: fc1, the activation and fc2 as separate ops (cuBLAS GEMMs; the activation is a
    compiled kernel in a compiled layer). `quack`: fc1 (and the gate) with the activation in its GEMM epilogue
    and fc2's data gradient with the activation's derivative (and fc1's bias gradient) in its epilogue, for a
    GELU MLP or a SwiGLU MLP without biases (pip package quack-kernels>=0.6.5; CUDA, bf16, hidden_size and
    intermediate_size / model_parallel_size multiples of 8, no sequence parallelism, ZeRO stage <= 2;
    megatron/model/fused_mlp.py); it keeps one `[s, b, intermediate/tp]` tensor per layer less (SwiGLU: two).
    null (the default) chooses for the device at start: `quack` for a bf16 GELU or SwiGLU MLP on Hopper when
    quack imports (megatron/training/device_defaults.py), else `torch`."""

    mlp_autotune: Optional[bool] = None
    """With `mlp_impl: quack`: quack autotunes its GEMM shapes at the first step (it times several tile
    configs) instead of taking its per-arch default config. null (the default): on wherever the MLP runs on
    quack (measured on an H200: +1.7% to +3.1% tokens/s over the default config, docs/PERFORMANCE.md; the
    first step also compiles and times the configs of each GEMM shape, which can take a minute or more),
    off otherwise; false takes quack's default config. quack keeps each
    shape's timings on disk (`$QUACK_CACHE_DIR`, else ~/.quack/cache) and a process that finds them there takes
    the same winner, so a run resumed on the same machine (or with that folder carried) runs the same tile
    configs; tuned afresh elsewhere, it may take another and sum in another order: the same to bf16 rounding,
    not bit for bit (as inductor's own autotuned kernels)."""

    sliding_window_width: Optional[int] = None
    """Sliding-window attention (GPT-NeoX's key, e.g. 4096 in its Mistral config): query i attends to keys
    i - w .. i (itself and the w tokens before it), through the kernels' window support (never a mask of
    s x s). None: full causal attention. Needs attention_impl fa4 or flash, or sdpa with torch >= 2.12 on
    CUDA (per-block SDPA on CPU)."""

    mlp_chunk_size: Optional[int] = None
    """Compute the MLP this many tokens (of the sequence) at a time, so its `[s, b, intermediate/tp]`
    activations never exist whole (4 GB per layer for 1.3B at 512k tokens). Exact: the MLP acts on each
    token alone. Under sequence parallelism the chunks are of each rank's sequence shard (each chunk is
    gathered and reduce-scattered on its own). The last chunk may be shorter. None: the whole sequence at
    once."""

    sdpa_backend: Optional[Literal["flash", "cudnn", "efficient", "math"]] = None
    """Force one SDPA backend (GPU). null (the default) chooses for the device at start: cudnn on Hopper
    GPUs for bf16/fp16 attention without dropout (measured fastest there), elsewhere torch's own choice."""

    fused_cross_entropy: bool = True
    """Compute the output projection and the cross-entropy loss together, chunk by chunk of tokens, with the
    gradients in the same pass: the full logits `[tokens, vocab/tp]` are never materialized. Disable to get
    plain logits followed by the vocab-parallel cross entropy (same loss and gradients, more memory)."""

    cross_entropy_chunk_size: int = 4096
    """Tokens per chunk of the fused cross entropy; its extra memory is about chunk x vocab/tp x 4 bytes in bf16
    on a GPU (one chunk's logits and their gradient). Must be >= 1."""


@dataclass
class ParallelArgs:
    """How the model and the batch are split over ranks."""

    model_parallel_size: int = 1
    """Tensor-parallel size (Megatron column/row split of every layer)."""

    pipe_parallel_size: int = 0
    """Pipeline stages (0 or 1 means no pipeline). Above 1 the model runs as DeepSpeed pipeline stages
    (megatron/model/pipeline.py) under its PipelineEngine; needs num_layers >= pipe_parallel_size and ZeRO
    stage 0 or 1 (DeepSpeed's pipeline engine refuses ZeRO-2/3)."""

    pipe_partition_method: Literal["type:transformer|mlp", "type:transformer", "parameters", "uniform"] = \
        "type:transformer|mlp"
    """How layers are cut into pipeline stages (DeepSpeed's methods, GPT-NeoX's values and default):
    `type:transformer|mlp` (GPT-NeoX's default) and `type:transformer` balance the number of transformer
    layers per stage (DeepSpeed matches the regex against layer class names; our stages have no separate MLP
    layers, so the two cut identically; the embedding goes to the first stage, the final norm and output
    head to the last), `parameters` balances parameter counts, `uniform` the number of layers counting
    embedding, norm and head as layers."""

    sequence_parallel: bool = False
    """Megatron-style sequence parallelism: norms/dropout/residual run on a sequence shard of each
    tensor-parallel rank (Korthikanti et al. 2022). Needs model_parallel_size > 1."""

    zero_optimization: dict = field(default_factory=lambda: {"stage": 0})
    """DeepSpeed ZeRO config, passed through (stage 0-3, offload_optimizer, ...); `stage` must be 0, 1, 2
    or 3."""


@dataclass
class OptimizerArgs:
    """Optimizer. YAML: `optimizer: {type: Adam, params: {lr: 6e-4, betas: [0.9, 0.95], eps: 1e-8}}`."""

    optimizer_type: Literal["Adam", "AdamW", "SGD"] = "AdamW"
    """Optimizer (YAML `optimizer.type`). Adam and AdamW both decouple weight decay (AdamW semantics)."""

    lr: Optional[float] = None
    """Peak learning rate (YAML `optimizer.params.lr`). Required, as in GPT-NeoX."""

    betas: tuple = (0.9, 0.999)
    """Adam betas (YAML `optimizer.params.betas`); the default is torch's and GPT-NeoX's (0.9, 0.999)."""

    eps: float = 1.0e-8
    """Adam epsilon (YAML `optimizer.params.eps`)."""

    weight_decay: float = 0.1
    """Decoupled weight decay (GPT-NeoX's default 0.1); never applied to norms, biases or 1-D parameters. A top-level key (GPT-NeoX
    style), also accepted as `optimizer.params.weight_decay` (not both)."""

    momentum: float = 0.0
    """SGD momentum (YAML `optimizer.params.momentum`)."""


@dataclass
class LRArgs:
    """Learning-rate schedule: linear warmup, then decay to min_lr."""

    lr_decay_style: Literal["constant", "linear", "cosine", "exponential"] = "linear"
    """Shape of the decay after warmup (GPT-NeoX's default linear); see megatron/training/lr_schedule.py
    for the exact formulas, which are GPT-NeoX's: linear runs toward 0 at lr_decay_iters and is clamped at
    min_lr, cosine keeps following the cosine past lr_decay_iters (clamped at min_lr)."""

    lr_decay_iters: Optional[int] = None
    """Iterations over which to decay; None means train_iters."""

    warmup: float = 0.01
    """Warmup length as a fraction of lr_decay_iters (GPT-NeoX semantics)."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""


@dataclass
class DataArgs:
    """Where the tokens come from."""

    data_path: Optional[str] = None
    """Prefix of one .bin/.idx pair, split into train/valid/test by `split`. Exactly one of data_path and
    train_data_paths must be set. `<prefix>.bin` and `.idx` must exist, except under `data/bundled/`
    (built on first use)."""

    train_data_paths: Optional[list] = None
    """Prefixes blended for training (instead of data_path)."""

    valid_data_paths: Optional[list] = None
    """Prefixes blended for validation."""

    test_data_paths: Optional[list] = None
    """Prefixes blended for test."""

    train_data_weights: Optional[list] = None
    """Blending weights of train_data_paths (default: equal weights, as GPT-NeoX)."""

    valid_data_weights: Optional[list] = None
    """Blending weights of valid_data_paths (default: equal)."""

    test_data_weights: Optional[list] = None
    """Blending weights of test_data_paths (default: equal)."""

    split: str = "969,30,1"
    """Train,valid,test proportions of data_path's documents."""

    data_impl: Literal["mmap"] = "mmap"
    """Dataset format; only the Megatron mmap .bin/.idx format."""

    data_cache_dir: Optional[str] = None
    """Where index caches (doc/sample/shuffle .npy) go; None means next to the data."""

    num_workers: int = 2
    """DataLoader worker processes per rank."""

    reset_attention_mask: bool = False
    """Document-aware attention (Megatron's key): a token attends only to the tokens of its own document,
    a document ending with the tokenizer's end-of-document token. Delivered with each micro-batch as
    document boundaries (`cu_seqlens`) for variable-length kernels, never as an s x s mask."""

    reset_position_ids: bool = False
    """Positions restart at 0 after each end-of-document token (Megatron's key), for rotary and learned
    position embeddings."""

    eod_mask_loss: bool = False
    """No loss where the input token is the end-of-document token (GPT-NeoX's key: the first token of the
    next document is not predicted from the previous one's end)."""


@dataclass
class TokenizerArgs:
    """Which tokenizer turns text into ids (used by preprocessing and for vocab size)."""

    tokenizer_type: Literal["GPT2BPETokenizer", "HFTokenizer", "HFGPT2Tokenizer", "SPMTokenizer",
                            "CharLevelTokenizer", "TiktokenTokenizer", "ByteLevelTokenizer"] = "GPT2BPETokenizer"
    """GPT2BPETokenizer (vocab.json + merges.txt; GPT-NeoX's default), HFTokenizer (a tokenizer.json),
    HFGPT2Tokenizer (GPT-2's vocab.json + merges.txt through transformers' GPT2TokenizerFast, eod
    `<|endoftext|>`), SPMTokenizer (a SentencePiece .model; eod is its `</s>`/eos id), CharLevelTokenizer
    (one id per Unicode code point below 512, upstream's rule; eod 0; no file), TiktokenTokenizer (a tiktoken
    encoding name such as cl100k_base as vocab_file, read from tiktoken's local cache, or a .tiktoken BPE
    file; eod `<|endoftext|>`), or ByteLevelTokenizer (256 bytes + end-of-document, needs no files)."""

    vocab_file: Optional[str] = None
    """tokenizer.json for HFTokenizer, vocab.json for GPT2BPETokenizer/HFGPT2Tokenizer, the .model file for
    SPMTokenizer, an encoding name or .tiktoken file for TiktokenTokenizer."""

    merge_file: Optional[str] = None
    """merges.txt for GPT2BPETokenizer."""


@dataclass
class PrecisionArgs:
    """Number formats (DeepSpeed's bf16/fp16 blocks, passed through)."""

    bf16: dict = field(default_factory=lambda: {"enabled": False})
    """DeepSpeed bf16 block, e.g. {enabled: true}."""

    fp16: dict = field(default_factory=lambda: {"enabled": False})
    """DeepSpeed fp16 block with loss scaling, e.g. {enabled: true, loss_scale: 0, initial_scale_power: 16}."""

    deepspeed_extra_args: dict = field(default_factory=dict)
    """Extra top-level blocks merged into the DeepSpeed config as given (GPT-NeoX's key), e.g.
    `{comms_logger: {enabled: true}}` or `{flops_profiler: {...}}`. A block this trainer writes itself
    (batch sizes, gradient_clipping, bf16, fp16, zero_optimization, data_types, ...) is refused here: set it
    through its own key."""

    data_types: dict = field(default_factory=dict)
    """DeepSpeed data_types block: {grad_accum_dtype: fp32} accumulates bf16/fp16 gradients in fp32 (DeepSpeed's
    BF16_Optimizer at ZeRO stage 1, as Megatron-DeepSpeed runs). Without it DeepSpeed accumulates them in the
    model dtype, which loses precision over many micro-batches. fp32 accumulation of bf16/fp16 gradients
    needs ZeRO stage >= 1 (DeepSpeed 0.19 does not implement it at stage 0)."""

    free_grad_sums_between_steps: Optional[bool] = None
    """With DeepSpeed's BF16_Optimizer (bf16 weights, `data_types.grad_accum_dtype: fp32`, ZeRO stage 1, the
    optimizer on the device): hand the fp32 gradient sums' memory (4 bytes a parameter) back to the
    allocator after each optimizer step and take it again when the next backward's gradients are added in.
    With one micro-batch per step the sums then never sit beside a forward's activations (the peak of most
    runs): 4.1 GiB less there for a 1.1B model (llama-1B at 2048 x 8 on an H200: 39.72 -> 35.60 GiB, the same
    tokens/s within 1%). Same numbers bit for bit. null (the default): on exactly where it lowers the peak,
    i.e. BF16_Optimizer fills the sums itself (no `bf16.immediate_grad_update`), one micro-batch per step
    and no pipeline; the choice is printed at start. true: on wherever BF16_Optimizer fills the sums (an
    error elsewhere); false: the sums are kept. Between steps the sums hold no memory: code of your own that
    reads them there (e.g. DeepSpeed's `safe_get_full_grad` after `step`) needs `false`."""

    fused_optimizer_step: Optional[bool] = None
    """With DeepSpeed's BF16_Optimizer on CUDA (bf16 weights, `data_types.grad_accum_dtype: fp32`, ZeRO stage 1,
    torch's fused AdamW on the device): its AdamW update and its copy of the fp32 masters into the bf16 weights
    run as one Triton kernel per parameter group (megatron/engine/fused_adamw.py), reading the masters once
    instead of twice. At one micro-batch per step and one data-parallel rank it reads the bf16 gradients where
    autograd left them, and the fp32 gradient sums are not filled at all (bf16 -> fp32 is exact: the same
    update). The same AdamW in fp32 (torch's formula; the update rounds alike up to a few fp32 ulps)
    and the same optimizer state, so checkpoints resume either way. null (the default): on wherever it can
    run (CUDA with Triton; the choice is printed at start); false: torch's fused AdamW and DeepSpeed's copy;
    true: as null, but an error where it cannot run."""

    communication_data_type: Optional[Literal["fp32", "bf16", "fp16"]] = None
    """dtype in which data-parallel replicas sum their gradients (DeepSpeed's key). None: the model dtype
    (DeepSpeed's default), which with `data_types.grad_accum_dtype: fp32` rounds the fp32 gradient sums to
    bf16/fp16 before they are summed over replicas; fp32 keeps them fp32 (as Megatron reduces bf16 runs'
    gradients) at twice the gradient traffic. No effect with one replica."""


@dataclass
class TrainingArgs:
    """The loop: batch sizes, length, evaluation, memory savers."""

    train_micro_batch_size_per_gpu: Optional[int] = None
    """Sequences per rank per forward/backward."""

    gradient_accumulation_steps: Optional[int] = None
    """Micro-batches accumulated per optimizer step."""

    train_batch_size: Optional[int] = None
    """Global sequences per optimizer step = micro * grad_acc * data_parallel_size. Give any two of the
    three (or all three, consistent); the third is derived."""

    train_iters: int = 100
    """Optimizer steps to train for."""

    seed: int = 1234
    """Seed for init, dropout and data order."""

    gradient_clipping: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""

    eval_interval: int = 1000
    """Run evaluation every this many iterations (and at the end)."""

    eval_iters: int = 100
    """Batches per evaluation."""

    checkpoint_activations: bool = False
    """Recompute each layer's activations in backward (activation checkpointing)."""

    checkpoint_num_layers: int = 1
    """Layers per checkpointed chunk."""

    partition_activations: bool = False
    """GPT-NeoX's key: with checkpoint_activations and model_parallel_size > 1, each tensor-parallel rank keeps
    only its 1/tp slice (along h) of every checkpointed chunk's `[s, b, h]` input, which is replicated on the
    tensor ranks, and all-gathers it again to recompute the chunk in backward. Same numbers, 1/tp of the
    checkpoint memory, one all-gather per chunk in forward and in backward. No effect at model_parallel_size 1,
    without checkpoint_activations, or under sequence_parallel (the input is already a sequence shard)."""

    checkpoint_in_cpu: bool = False
    """Activation offload (GPT-NeoX's key): with checkpoint_activations, each checkpointed chunk's input is
    kept in host memory (pinned, copied asynchronously on a side stream on CUDA) instead of on the device,
    and copied back for the recomputation in backward. Saves num_layers/checkpoint_num_layers x s x b x h
    activations of device memory (e.g. 48 GiB for 1.3B at 512k tokens) for as much pinned host memory."""

    checkpoint_keep_attention: bool = False
    """With checkpoint_activations: each layer is checkpointed in two pieces around its attention kernel
    (norm + qkv projection + rotary; output projection + residual + MLP), so backward recomputes both pieces
    but never the kernel's forward. The kernel keeps q, k, v, its output and its softmax statistics: about
    4 more [s, b, h/tp] tensors per layer than plain checkpointing (fewer with grouped-query attention), for
    one attention forward less per layer and step, most of a layer's recompute at long sequences. Needs
    checkpoint_num_layers 1 and checkpoint_in_cpu false."""

    recompute_modules: list = field(default_factory=list)
    """Selective recomputation (Megatron-Core's key and names), for runs without checkpoint_activations: the
    listed parts of every layer keep only their inputs and are recomputed in backward. `core_attn`: the
    attention kernel (its output and softmax statistics, [s, b, h/t] per layer, recomputed from q, k, v);
    `mlp_act`: the MLP activation (gelu/relu output, or swiglu's silu(gate) x up: 1 x or 2 x
    [s, b, intermediate/t] per layer, recomputed from fc1's output). Exact (dropout masks replayed)."""

    torch_compile: Optional[bool] = None
    """torch.compile each transformer layer. null (the default) chooses for the device at start: on for CUDA,
    off for CPU (printed at start; megatron/training/device_defaults.py)."""

    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's `mode` for the compiled layers. `reduce-overhead`: each layer's forward and backward are
    recorded once as CUDA graphs (torch's CUDA-graph trees) and replayed, so the host no longer launches every
    kernel itself; the step marks each micro-batch as a new graph iteration. Needs a static shape, no pipeline
    (pipe_parallel_size <= 1), no activation checkpointing and no recompute_modules (those run layer forwards
    inside backward). `max-autotune-no-cudagraphs`: inductor times its own kernel choices at the first step;
    `max-autotune`: both. Acts only where layers are compiled (torch_compile)."""

    max_consecutive_nonfinite_steps: int = 20
    """Divergence policy: an optimizer step whose loss or gradient norm is not finite (NaN/inf) is skipped
    (the weights and optimizer states stay as they were; fp16 loss-scale overflows count too); after this
    many such steps in a row the run stops with a message naming the step and the last good checkpoint,
    saving nothing. 0 stops at the first one. Checked every step in fp32, every `log_interval` steps in
    bf16 (whose step skips on the device without waiting for it)."""

    memory_check: bool = True
    """Before building the model, estimate this rank's device and host memory (weights, gradients, fp32
    masters, optimizer states, activations with checkpointing/offload/chunking, pinned buffers:
    megatron/training/memory_estimate.py) and refuse a run that cannot fit (config error with the numbers)
    instead of it being killed later. false: skip the check."""


@dataclass
class CheckpointArgs:
    """Saving and resuming."""

    save: Optional[str] = None
    """Directory to save checkpoints in (None: never save)."""

    load: Optional[str] = None
    """Directory to resume from (its `latest` checkpoint)."""

    checkpoint_factor: Optional[int] = None
    """Save every this many iterations (and always at the end when save is set)."""

    extra_save_iters: Optional[list] = None
    """Iterations at which to save a checkpoint in addition to every checkpoint_factor (GPT-NeoX's key;
    Pythia saves at [0, 1, 2, 4, ..., 512]); 0 saves the initial weights before the first step."""

    keep_last_n_checkpoints: Optional[int] = None
    """Delete older checkpoints, keeping this many (None keeps all)."""

    finetune: bool = False
    """Load weights only from `load`: iteration, optimizer, lr schedule and data position start fresh."""

    overwrite_checkpoints: bool = False
    """Start a fresh run (no `load`) in a `save` directory that already holds checkpoints: its `global_step*`
    checkpoints and `latest` are deleted when the run starts. Without it such a run is refused, so that
    repeating a command never replaces a longer run's checkpoints."""

    fallback_to_older_checkpoint: bool = False
    """When the checkpoint `latest` names fails its checksums (a damaged file), resume from the newest
    older checkpoint that passes them (with a warning) instead of stopping."""


@dataclass
class LoggingArgs:
    """What the run reports, and where."""

    log_interval: int = 100
    """Print a metrics line every this many iterations."""

    log_dir: Optional[str] = None
    """Directory for metrics.jsonl and the saved config; None means `runs/<timestamp>`."""

    tensorboard_dir: Optional[str] = None
    """Write TensorBoard events here (None: off)."""

    use_wandb: bool = False
    """Log to Weights & Biases (offline when no API key is set; never blocks)."""

    wandb_project: str = "neox"
    """W&B project."""

    wandb_group: Optional[str] = None
    """W&B group."""

    wandb_team: Optional[str] = None
    """W&B team (entity) the run is logged under; None: the API key's default entity."""

    wandb_host: str = "https://api.wandb.ai"
    """W&B server URL (a self-hosted server), GPT-NeoX's key and default."""

    peak_flops_per_device: Optional[float] = None
    """Peak dense bf16 FLOP/s of one device, for MFU; None picks a default by device name (H100 989e12)."""


@dataclass
class LauncherArgs:
    """How deepy.py starts the ranks (DeepSpeed launcher)."""

    num_gpus: Optional[int] = None
    """Processes per node; None means every visible GPU (1 on a CPU-only machine), or the hostfile's
    slots per host when a hostfile is given."""

    num_nodes: int = -1
    """Nodes to use from the hostfile: the first num_nodes hosts (-1: all). Without a hostfile only
    Slurm launches may ask for more than one node (world_size = num_nodes * num_gpus)."""

    hostfile: Optional[str] = None
    """DeepSpeed hostfile for multi-node runs (`host slots=N` lines)."""

    include: Optional[str] = None
    """DeepSpeed --include, e.g. 'host1:0,1@host2' (hosts joined by `@`, optional `:slot,slot`); the
    world size counts only the included hosts/slots. Not together with num_nodes/num_gpus (DeepSpeed
    refuses that)."""

    exclude: Optional[str] = None
    """DeepSpeed --exclude, same form as include; the excluded hosts/slots are not counted in the world
    size. Not together with include, num_nodes or num_gpus."""

    master_port: int = 29500
    """Rendezvous port."""

    master_addr: Optional[str] = None
    """Rendezvous address (multi-node)."""

    launcher: Literal["pdsh", "openmpi", "mvapich", "slurm"] = "pdsh"
    """Multi-node launcher DeepSpeed uses."""

    deepspeed_slurm: bool = False
    """Started by srun: read ranks from Slurm's environment instead of launching."""

    comment: Optional[str] = None
    """Slurm job comment (GPT-NeoX's key, some clusters require one): passed to srun as `--comment` with
    `launcher: slurm`. With deepspeed_slurm (srun already started) give it to your own srun instead."""


SECTIONS = {
    "model": ModelArgs,
    "parallel": ParallelArgs,
    "optimizer": OptimizerArgs,
    "lr": LRArgs,
    "data": DataArgs,
    "tokenizer": TokenizerArgs,
    "precision": PrecisionArgs,
    "training": TrainingArgs,
    "checkpoint": CheckpointArgs,
    "logging": LoggingArgs,
    "launcher": LauncherArgs,
}
"""Section name on NeoXArgs -> its dataclass."""


@dataclass
class DerivedArgs:
    """Values computed from the sections once (deepy.py) and never written by the user."""

    world_size: int = 1
    """Total ranks: the hosts/slots the launcher will use (hostfile, include/exclude, num_nodes,
    num_gpus), or the world_size given to NeoXArgs.from_ymls/from_dict."""

    data_parallel_size: int = 1
    """world_size / (model_parallel_size * max(pipe_parallel_size, 1))."""

    train_batch_size: int = 1
    """micro * grad_acc * data_parallel_size."""

    train_micro_batch_size_per_gpu: int = 1
    """Resolved micro batch."""

    gradient_accumulation_steps: int = 1
    """Resolved accumulation."""

    num_kv_heads: int = 1
    """Resolved key/value heads."""

    intermediate_size: int = 1
    """Resolved MLP width."""

    max_position_embeddings: int = 1
    """Resolved max positions."""

    lr_decay_iters: int = 1
    """Resolved decay length."""

    warmup_iters: int = 0
    """round(warmup * lr_decay_iters)."""

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Resolved compute format."""

    free_grad_sums: bool = False
    """Resolved free_grad_sums_between_steps (null: on for BF16_Optimizer's own sums at one micro-batch per
    step without a pipeline)."""

    vocab_size: int = 0
    """Tokenizer vocabulary before padding (set when the tokenizer is known)."""

    padded_vocab_size: int = 0
    """vocab_size rounded up to make_vocab_size_divisible_by * model_parallel_size."""
