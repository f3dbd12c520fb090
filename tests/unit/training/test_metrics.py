"""Hand-computed checks of the FLOP accounting, the peak table and the throughput meter."""

from types import SimpleNamespace

import pytest

from megatron.neox_args.sections import DerivedArgs, LoggingArgs, ModelArgs, TrainingArgs
from megatron.training.metrics import (
    ThroughputMeter,
    ThroughputStats,
    count_non_embedding_params,
    default_peak_flops,
    flops_per_token,
)


def pythia_410m():
    model = ModelArgs(
        num_layers=24, hidden_size=1024, num_attention_heads=16, seq_length=2048, rotary_pct=0.25,
        gpt_j_residual=True, no_weight_tying=True, activation="gelu", norm="layernorm",
    )
    derived = DerivedArgs(num_kv_heads=16, intermediate_size=4096, padded_vocab_size=50304)
    return model, derived


def test_pythia_410m_flops_per_token():
    model, derived = pythia_410m()
    # per layer: qkv 1024*3072+3072, out 1024*1024+1024, mlp 2*1024*4096+4096+1024, 2 LayerNorms 4*1024
    per_layer = (1024 * 3072 + 3072) + (1024 * 1024 + 1024) + (2 * 1024 * 4096 + 4096 + 1024) + 4 * 1024
    expected_n = 24 * per_layer + 2 * 1024 + 1024 * 50304
    assert count_non_embedding_params(model, derived) == expected_n == 353_822_720
    flops = flops_per_token(model, derived, 2048)
    assert flops == 6 * expected_n + 12 * 24 * 1024 * 2048
    assert flops == pytest.approx(2.727e9, rel=1e-3)
    # causal attention: half the score matrix, 6 L h s
    causal = flops_per_token(model, derived, 2048, causal=True)
    assert causal == 6 * expected_n + 6 * 24 * 1024 * 2048
    assert flops - causal == 6 * 24 * 1024 * 2048


def test_causal_figure_at_long_sequence_matches_the_issue():
    # 1.3B (24 x 2048, 16 heads, vocab 50304) at 131072 tokens: the measured "71.3%" is ~39% causal
    model = ModelArgs(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=131072,
                      gpt_j_residual=True, no_weight_tying=True)
    derived = DerivedArgs(num_kv_heads=16, intermediate_size=8192, padded_vocab_size=50304)
    full = flops_per_token(model, derived, 131072)
    causal = flops_per_token(model, derived, 131072, causal=True)
    n = count_non_embedding_params(model, derived)
    assert full == 6 * n + 12 * 24 * 2048 * 131072 and causal == 6 * n + 6 * 24 * 2048 * 131072
    assert 0.713 * causal / full == pytest.approx(0.389, abs=0.002)


def test_tied_embeddings_still_count_output_layer():
    model, derived = pythia_410m()
    model.no_weight_tying = False
    assert count_non_embedding_params(model, derived) == 353_822_720


def test_swiglu_gqa_rmsnorm_without_biases():
    model = ModelArgs(
        num_layers=2, hidden_size=64, num_attention_heads=8, num_kv_heads=2, activation="swiglu",
        norm="rmsnorm", use_bias_in_attn_linear=False, use_bias_in_mlp=False,
    )
    derived = DerivedArgs(num_kv_heads=2, intermediate_size=176, padded_vocab_size=256)
    head_dim = 8
    qkv = 64 * (64 + 2 * 2 * head_dim)  # 64 * 96
    per_layer = qkv + 64 * 64 + 3 * 64 * 176 + 2 * 64
    assert count_non_embedding_params(model, derived) == 2 * per_layer + 64 + 64 * 256


def test_biases_toggle_changes_count():
    model, derived = pythia_410m()
    with_bias = count_non_embedding_params(model, derived)
    model.use_bias_in_attn_linear = False
    model.use_bias_in_mlp = False
    model.use_bias_in_norms = False
    # per layer: attention 3072+1024, mlp 4096+1024, norm biases 2*1024; final norm bias 1024
    assert with_bias - count_non_embedding_params(model, derived) == 24 * (4096 + 5120 + 2048) + 1024


def test_unset_vocab_is_a_clear_error():
    model, derived = pythia_410m()
    derived.padded_vocab_size = 0
    with pytest.raises(ValueError, match="set_vocab_size"):
        flops_per_token(model, derived, 2048)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("cpu", None),
        (None, None),
    ],
)
def test_default_peak_flops(name, peak):
    assert default_peak_flops(name) == peak


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_throughput_meter_interval_values():
    clock = FakeClock()
    meter = ThroughputMeter(
        tokens_per_step=8 * 2048, flops_per_token=2.727e9, num_devices=8, flops_per_token_causal=2.4e9,
        peak_flops_per_device=989e12, total_iters=1000, clock=clock,
    )
    clock.now += 10.0  # 20 steps in 10 s
    stats = meter.update(20)
    assert stats.step_time_s == pytest.approx(0.5)
    assert stats.tokens_per_s == pytest.approx(16384 / 0.5)
    assert stats.tflops_per_device == pytest.approx(32768 * 2.727e9 / 8 / 1e12)
    assert stats.mfu == pytest.approx(32768 * 2.727e9 / 8 / 989e12)
    assert stats.tflops_per_device_causal == pytest.approx(32768 * 2.4e9 / 8 / 1e12)
    assert stats.mfu_causal == pytest.approx(32768 * 2.4e9 / 8 / 989e12)
    assert stats.eta_s == pytest.approx(980 * 0.5)
    assert stats.elapsed_s == pytest.approx(10.0)

    clock.now += 30.0  # an evaluation: excluded from the next interval and from the ETA
    meter.mark(20)
    clock.now += 2.0  # 10 steps in 2 s
    stats = meter.update(30)
    assert stats.step_time_s == pytest.approx(0.2)
    assert stats.elapsed_s == pytest.approx(42.0)
    assert stats.eta_s == pytest.approx(970 * (10.0 + 2.0) / 30)


def test_throughput_meter_caller_time_and_unknown_peak():
    clock = FakeClock()
    meter = ThroughputMeter(tokens_per_step=100, flops_per_token=1e6, num_devices=1, start_iteration=50,
                            clock=clock)
    clock.now += 99.0
    stats = meter.update(60, 0.5)  # the caller's measured step time wins over the clock
    assert stats.step_time_s == 0.5 and stats.tokens_per_s == pytest.approx(200.0)
    assert stats.mfu is None and stats.mfu_causal is None and stats.eta_s is None
    assert stats.tflops_per_device_causal == stats.tflops_per_device  # no causal count given: the same
    with pytest.raises(ValueError, match="not after"):
        meter.update(60)


def test_stats_merge_into_a_record_as_a_mapping():
    record = {"loss": 1.0}
    record.update(ThroughputStats(iteration=3, step_time_s=0.5, tokens_per_s=2.0, tflops_per_device=1.0,
                                  mfu=None, eta_s=4.0, elapsed_s=9.0))
    assert record == {"loss": 1.0, "step_time_s": 0.5, "tokens_per_s": 2.0, "tflops_per_device": 1.0,
                      "mfu": None, "eta_s": 4.0, "elapsed_s": 9.0, "tflops_per_device_causal": None,
                      "mfu_causal": None}


def test_for_run_reads_the_resolved_config():
    model, derived = pythia_410m()
    derived.world_size, derived.train_batch_size = 4, 32
    args = SimpleNamespace(model=model, derived=derived, training=TrainingArgs(train_iters=500),
                           logging=LoggingArgs(peak_flops_per_device=100e12))
    meter = ThroughputMeter.for_run(args, "cpu")
    assert meter.tokens_per_step == 32 * 2048 and meter.num_devices == 4 and meter.total_iters == 500
    assert meter.flops_per_token == flops_per_token(model, derived, 2048)
    assert meter.flops_per_token_causal == flops_per_token(model, derived, 2048, causal=True)
    assert meter.peak_flops_per_device == 100e12
    args.logging.peak_flops_per_device = None
    assert ThroughputMeter.for_run(args, "cpu").peak_flops_per_device is None
