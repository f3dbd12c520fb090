"""The memory estimate: its terms against the issue's H200 measurements, against the measured CPU memory
of a small fp32 model, and the refusal of a run that cannot fit (the 6.9B ZeRO-2 CPU-offload run that
the kernel killed on a 128 GiB host)."""


import pytest
import torch

from megatron.neox_args import ConfigError, NeoXArgs
from megatron.training.memory_estimate import GIB, check_memory, estimate_memory, pinned_size, total_params

SETUP = {"data_path": "data/bundled/pystdlib_text_document", "tokenizer_type": "ByteLevelTokenizer"}


def _args(size_file, vocab=50277, **overrides):
    from megatron.neox_args.loader import read_yaml_file

    config = {**read_yaml_file(f"configs/{size_file}"), **SETUP,
              "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "model_parallel_size": 1}
    config.pop("train_batch_size", None)
    config.update(overrides)
    args = NeoXArgs.from_dict(config, world_size=1)
    args.set_vocab_size(vocab)
    return args


# (size file, seq, measured peak GiB on one H200 (issue 16, bf16, compile, full checkpointing, ZeRO-1))
MEASURED = [("1-3B.yml", 32768, 29.4), ("1-3B.yml", 131072, 45.5), ("1-3B.yml", 262144, 67.1),
            ("6-9B.yml", 32768, 132.2)]


@pytest.mark.parametrize("size_file, seq, peak_gib", MEASURED)
def test_device_estimate_matches_the_h200_measurements(size_file, seq, peak_gib):
    args = _args(size_file, seq_length=seq, max_position_embeddings=seq, torch_compile=True,
                 free_grad_sums_between_steps=False)  # measured with the sums kept
    est = estimate_memory(args)
    assert est.device_bytes / GIB == pytest.approx(peak_gib, rel=0.06)


# (size file, vocab, seq, micro-batch, measured peak GiB on one H200, no checkpointing, compiled, bf16, ZeRO-1;
# docs/measurements/2026-12-01_h200_bench_{llama1B_immediate,llama1B_8k_fa4,1.3B_2k_fa4}_7627004.json and
# 2026-12-01_h200_bench_410M_defaults_4dd6ce8.json)
MEASURED_UNCHECKPOINTED = [("llama-1B.yml", 32768, 2048, 8, 39.72), ("llama-1B.yml", 32768, 8192, 2, 40.47),
                           ("410M.yml", 50277, 2048, 8, 20.69), ("1-3B.yml", 50277, 2048, 12, 63.50)]


@pytest.mark.parametrize("size_file, vocab, seq, micro, peak_gib", MEASURED_UNCHECKPOINTED)
def test_device_estimate_without_checkpointing_matches_the_h200_measurements(size_file, vocab, seq, micro, peak_gib):
    args = _args(size_file, vocab=vocab, seq_length=seq, max_position_embeddings=seq, torch_compile=True,
                 checkpoint_activations=False, train_micro_batch_size_per_gpu=micro,
                 free_grad_sums_between_steps=False)  # measured with the sums kept
    assert estimate_memory(args).device_bytes / GIB == pytest.approx(peak_gib, rel=0.04)


# the same runs with the sums freed between steps, as the size files now get by default (one H200,
# commit 5ca973c, docs/measurements/2026-12-01_h200_bench_*_freed_5ca973c.json, "freed" rows)
MEASURED_FREED = [("llama-1B.yml", 32768, 2048, 8, 35.60), ("llama-1B.yml", 32768, 8192, 2, 36.35),
                  ("410M.yml", 50277, 2048, 8, 19.18), ("1-3B.yml", 50277, 2048, 12, 58.23)]


@pytest.mark.parametrize("size_file, vocab, seq, micro, peak_gib", MEASURED_FREED)
def test_device_estimate_with_freed_sums_matches_the_h200_measurements(size_file, vocab, seq, micro, peak_gib):
    args = _args(size_file, vocab=vocab, seq_length=seq, max_position_embeddings=seq, torch_compile=True,
                 checkpoint_activations=False, train_micro_batch_size_per_gpu=micro)
    assert args.derived.free_grad_sums  # unset: on at one micro-batch per step
    assert estimate_memory(args).device_bytes / GIB == pytest.approx(peak_gib, rel=0.04)


def test_device_estimate_with_the_fused_mlp_matches_the_h200_measurement():
    """410M at 2048 x 8 with mlp_impl quack: 16.18 GiB measured against 19.18 for the torch layer in the same
    run (one H200, commit 283ff9c, docs/measurements/2026-12-01_h200_bench_410M_mlp_untuned_283ff9c.json)."""
    common = dict(seq_length=2048, max_position_embeddings=2048, torch_compile=True, checkpoint_activations=False,
                  train_micro_batch_size_per_gpu=8, bf16={"enabled": True})
    fused = estimate_memory(_args("410M.yml", mlp_impl="quack", **common)).device_bytes / GIB
    unfused = estimate_memory(_args("410M.yml", mlp_impl="torch", **common)).device_bytes / GIB
    assert fused == pytest.approx(16.18, rel=0.04) and unfused == pytest.approx(19.18, rel=0.04)
    assert unfused - fused == pytest.approx(24 * 16384 * 4096 * 2 / GIB)  # one [s, b, ffn] bf16 tensor a layer


def test_device_estimate_with_the_fused_swiglu_mlp_matches_the_h200_measurement():
    """The llama-1B shape at 2048 x 8 with mlp_impl quack (SwiGLU, no biases): 31.60 GiB measured against 35.60
    for the torch layer in the same run (one H200, commit b5323ac,
    docs/measurements/2026-12-02_h200_bench_llama1B_2k_swiglu_b5323ac.json)."""
    common = dict(vocab=32768, seq_length=2048, max_position_embeddings=2048, torch_compile=True,
                  checkpoint_activations=False, train_micro_batch_size_per_gpu=8)
    fused = estimate_memory(_args("llama-1B.yml", mlp_impl="quack", **common)).device_bytes / GIB
    unfused = estimate_memory(_args("llama-1B.yml", mlp_impl="torch", **common)).device_bytes / GIB
    assert fused == pytest.approx(31.60, rel=0.04) and unfused == pytest.approx(35.60, rel=0.04)
    # the compiled torch layer keeps gate, up and their product for fc2 (3 [s, b, ffn]), the fused one the
    # preactivation [s, b, 2 ffn] (2): one bf16 [s, b, ffn] tensor a layer less
    assert unfused - fused == pytest.approx(16 * 16384 * 8192 * 2 / GIB)


def test_freed_gradient_sums_count_only_after_backward():
    """free_grad_sums_between_steps: with one micro-batch per step the fp32 sums (4 P) exist beside the bf16
    gradients (a P) after backward, never beside a forward's activations; with more micro-batches they live
    through the later forwards and count in full."""
    common = dict(vocab=32768, seq_length=2048, max_position_embeddings=2048, torch_compile=True,
                  checkpoint_activations=False, train_micro_batch_size_per_gpu=8)
    kept = estimate_memory(_args("llama-1B.yml", free_grad_sums_between_steps=False, **common))
    freed_args = _args("llama-1B.yml", free_grad_sums_between_steps=True, **common)
    freed = estimate_memory(freed_args)
    p = total_params(freed_args.model, freed_args.derived)
    # activations (~20 GiB) dwarf a P + 4 P (6.2 GiB): the sums add nothing to the peak
    assert "fp32 gradient sums" not in freed.device and "fp32 gradient sums (after backward only)" not in freed.device
    assert kept.device_bytes - freed.device_bytes == pytest.approx(4 * p)
    accumulating = estimate_memory(_args("llama-1B.yml", free_grad_sums_between_steps=True,
                                         gradient_accumulation_steps=2, **common))
    assert accumulating.device_bytes == kept.device_bytes
    # 6.9B at 128k with its inputs on the host: after backward (2 P + 4 P = 38 GiB) is the larger phase
    long = dict(seq_length=131072, max_position_embeddings=131072, torch_compile=True, checkpoint_in_cpu=True,
                mlp_chunk_size=16384, free_grad_sums_between_steps=True)
    big_args = _args("6-9B.yml", **long)
    big = estimate_memory(big_args)
    p = total_params(big_args.model, big_args.derived)
    static = sum(big.device[k] for k in ("weights", "Adam states", "fp32 masters"))
    assert big.device_bytes == pytest.approx(static + 2 * p + 4 * p)
    assert big.device_bytes / GIB < 131.0  # below the immediate_grad_update estimate of the shipped file


def test_the_killed_offload_runs_are_refused_on_the_h200_host():
    """6.9B with ZeRO-2 + CPU offload was killed by the kernel on the H200's 125 GiB host twice: pinned
    (issue 16's first try) and unpinned (2026-12-01, host use 124.7 GiB when killed, the Adam states not yet
    all written). Both must be refused before start; the unpinned one fits a host with room for it."""
    common = dict(seq_length=32768, max_position_embeddings=32768, torch_compile=True, data_types={})
    pinned = _args("6-9B.yml", zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu",
                                                                                   "pin_memory": True}}, **common)
    est = estimate_memory(pinned)
    p = total_params(pinned.model, pinned.derived)
    # fp32 masters and gradients (4 P each) and the bf16 buffer (2 P) pinned and rounded up, Adam 8 P
    assert est.host["offload: fp32 masters"] == pinned_size(4 * p) == 32 * GIB
    assert est.host["offload: Adam states"] == 8 * p
    with pytest.raises(ConfigError, match=r"needs about 160\.\d GiB of host memory .* 125\.0 GiB are available"):
        check_memory(pinned, est, device_free=139 * GIB, host_available=125 * GIB)
    unpinned = _args("6-9B.yml", zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu",
                                                                                     "pin_memory": False}}, **common)
    est = estimate_memory(unpinned)
    # the measured host trace: 67 GiB after init (masters + fp32 gradients + bf16 buffer + ~3 GiB), +24 GiB
    # in the first backward, then the 51 GiB of Adam states: more than the 124.7 GiB it was killed at
    after_init = sum(est.host[f"offload: {k}"] for k in ("fp32 masters", "fp32 gradients", "bf16 copy buffer"))
    assert after_init / GIB == pytest.approx(67 - 3, abs=2)
    assert est.host_bytes / GIB > 124.7 + 10
    with pytest.raises(ConfigError, match=r"needs about 14\d\.\d GiB of host memory"):
        check_memory(unpinned, est, device_free=139 * GIB, host_available=125 * GIB)
    check_memory(unpinned, est, device_free=139 * GIB, host_available=160 * GIB)
    # two ranks on a 250 GiB host do not fit
    with pytest.raises(ConfigError, match="2 rank"):
        check_memory(unpinned, est, None, 250 * GIB, ranks_per_host=2)


def test_device_refusal_names_the_numbers_and_the_levers():
    args = _args("6-9B.yml", seq_length=131072, max_position_embeddings=131072)
    with pytest.raises(ConfigError) as info:
        check_memory(args, estimate_memory(args), device_free=139 * GIB, host_available=None)
    message = str(info.value)
    assert "GiB of device memory" in message and "139.0 GiB are free" in message
    assert "offload_optimizer" in message and "memory_check: false" in message


def test_levers_move_memory_where_they_should():
    base = dict(seq_length=524288, max_position_embeddings=524288, torch_compile=True)
    plain = estimate_memory(_args("1-3B.yml", **base))
    chunked = estimate_memory(_args("1-3B.yml", mlp_chunk_size=65536, **base))
    offloaded = estimate_memory(_args("1-3B.yml", mlp_chunk_size=65536, checkpoint_in_cpu=True, **base))
    e = 524288 * 2048 * 2  # one [s, b, h] bf16 activation
    assert plain.device["checkpointed inputs"] == 24 * e
    assert plain.device["recomputed chunk"] - chunked.device["recomputed chunk"] == pytest.approx(4 * e * (1 - 1 / 8))
    assert "checkpointed inputs" not in offloaded.device
    assert offloaded.host["checkpointed inputs (pinned)"] == 24 * pinned_size(e)
    kept = estimate_memory(_args("1-3B.yml", mlp_chunk_size=65536, checkpoint_keep_attention=True, **base))
    # q, k, v and the output (4 [s, b, h] bf16 each, 16 heads of 128) + fp32 statistics [16, s], per layer
    assert kept.device["kept attention tensors"] == 24 * (4 * e + 4 * 16 * 524288)
    assert kept.device_bytes - chunked.device_bytes == kept.device["kept attention tensors"]


def test_static_estimate_matches_the_tensors_a_cpu_step_holds():
    """fp32, ZeRO-0, torch AdamW on CPU: weights 4P + gradients 4P + Adam states 8P, measured as the bytes of
    the tensors that exist after building the model and taking one optimizer step (parameters, their
    gradients, and every tensor of the optimizer's state). Counting tensors, not the process's resident
    memory, keeps the check independent of what the allocator kept from earlier tests."""
    from megatron.model import GPTModel
    from megatron.mpu.initialize import ParallelState

    args = _args("tiny.yml", vocab=257, num_layers=4, hidden_size=512, num_attention_heads=8, seq_length=64,
                 max_position_embeddings=64)
    est = estimate_memory(args)
    model = GPTModel(args.model, args.derived, ParallelState.single())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 257, (1, 64))
    model(tokens, tokens).backward()
    optimizer.step()
    params = list(model.parameters())
    measured = {
        "weights": sum(p.numel() * p.element_size() for p in params),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "Adam states": sum(t.numel() * t.element_size() for state in optimizer.state.values()
                           for t in state.values() if torch.is_tensor(t) and t.dim() > 0),
    }
    n = sum(p.numel() for p in params)
    assert n == total_params(args.model, args.derived)
    for term, value in measured.items():
        assert est.device[term] == pytest.approx(value, rel=0.02), (term, est.device[term] / 2**20, value / 2**20)


def test_run_check_reads_the_host_and_can_be_turned_off(monkeypatch):
    from megatron.training import memory_estimate

    args = _args("tiny.yml", vocab=257)
    need = estimate_memory(args, "cpu").host_bytes
    monkeypatch.setattr(memory_estimate, "_host_available_bytes", lambda: 1.5 * need)
    monkeypatch.setenv("LOCAL_SIZE", "1")
    memory_estimate.check_run_memory(args, "cpu")  # one rank fits
    monkeypatch.setenv("LOCAL_SIZE", "2")
    with pytest.raises(ConfigError, match=r"2 rank\(s\)"):
        memory_estimate.check_run_memory(args, "cpu")
    args.training.memory_check = False
    memory_estimate.check_run_memory(args, "cpu")


@pytest.mark.parametrize("overrides, ffn", [(dict(gpt_j_residual=True, rotary_pct=0.25), 1024),
                                            (dict(gpt_j_residual=False), 1024),
                                            (dict(activation="swiglu", num_kv_heads=2), 768),
                                            (dict(pos_emb="learned"), 1024)])
def test_layer_activation_term_matches_the_saved_tensors_of_a_cpu_layer(overrides, ffn):
    """Bytes of the unique storages autograd saves in one layer's forward (fp32, CPU, no checkpointing;
    the CPU SDPA kernel keeps out and logsumexp like a flash kernel) against `layer_activation_elements`."""
    from megatron.neox_args.sections import DerivedArgs, ModelArgs
    from megatron.training.memory_estimate import layer_activation_elements
    from tests.helpers.models import saved_layer_elements

    model_args = ModelArgs(num_layers=1, hidden_size=256, num_attention_heads=4, seq_length=64, **overrides)
    derived = DerivedArgs(num_kv_heads=model_args.num_kv_heads or 4, intermediate_size=ffn, max_position_embeddings=64,
                          vocab_size=128, padded_vocab_size=128)
    measured = saved_layer_elements(model_args, derived)
    assert measured == pytest.approx(layer_activation_elements(model_args, derived, 1, False, False), rel=0.03)


def test_bf16_gradients_alive_at_the_end_of_backward_unless_folded_as_produced():
    """BF16_Optimizer adds the bf16 gradients to their fp32 sums after backward, so at its end all a P of them
    are alive (beyond the freed checkpointed inputs and head activations); `bf16.immediate_grad_update` folds
    and frees each as it is produced. 6.9B at 128k with its inputs on the host: 139.2 GiB (refused on the
    139 GiB H200) against 131.0 with immediate_grad_update (configs/long_seq/6-9B-128k.yml)."""
    common = dict(seq_length=131072, max_position_embeddings=131072, torch_compile=True, checkpoint_in_cpu=True,
                  mlp_chunk_size=16384)
    late = _args("6-9B.yml", free_grad_sums_between_steps=False, **common)  # the sums kept through the step
    folded = _args("6-9B.yml", bf16={"enabled": True, "immediate_grad_update": True}, **common)
    est_late, est_folded = estimate_memory(late), estimate_memory(folded)
    p = total_params(late.model, late.derived)
    assert "bf16 gradients before their fold" not in est_folded.device
    assert est_late.device["bf16 gradients before their fold"] == pytest.approx(2 * p - est_late.device["head and loss"])
    assert est_late.device_bytes - est_folded.device_bytes == est_late.device["bf16 gradients before their fold"]
    with pytest.raises(ConfigError, match=r"immediate_grad_update: true"):
        check_memory(late, est_late, device_free=139 * GIB, host_available=None)
    check_memory(folded, est_folded, device_free=139 * GIB, host_available=None)
    # with the inputs on the device they are freed by the end of backward and cover the bf16 gradients of 1.3B
    small = _args("1-3B.yml", seq_length=32768, max_position_embeddings=32768, torch_compile=True,
                  free_grad_sums_between_steps=False)
    assert "bf16 gradients before their fold" not in estimate_memory(small).device
