"""tools/bench arithmetic and rendering: median, tokens/s, TFLOP/s, MFU, ratios, --set parsing, table cells."""

from __future__ import annotations

import os
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tools", "bench")
sys.path.insert(0, os.path.abspath(BENCH_DIR))

from bench_config import apply_overrides, parse_set  # noqa: E402
from bench_report import render_markdown, row_cells  # noqa: E402
from bench_stats import add_ratios, ratio, summarize_step_times, throughput  # noqa: E402


def test_summary_reports_the_median_not_the_mean():
    summary = summarize_step_times([0.5, 0.1, 0.2, 0.3, 9.0])  # one slow outlier
    assert summary["median_step_s"] == 0.3
    assert summary["mean_step_s"] == pytest.approx(2.02)
    assert (summary["min_step_s"], summary["max_step_s"]) == (0.1, 9.0)
    assert summarize_step_times([0.1, 0.3])["median_step_s"] == pytest.approx(0.2)  # even count: midpoint
    with pytest.raises(ValueError):
        summarize_step_times([])


def test_throughput_and_mfu_arithmetic():
    # 8 x 2048 tokens in 0.5 s on a device of peak 989 TFLOP/s, 1e9 FLOPs per token
    out = throughput(16384, 0.5, 1e9, 989e12)
    assert out["tokens_per_s"] == pytest.approx(32768.0)
    assert out["tflops"] == pytest.approx(32.768)
    assert out["mfu"] == pytest.approx(32.768e12 / 989e12)
    assert out["tflops_causal"] == out["tflops"] and out["mfu_causal"] == out["mfu"]  # no causal count given
    both = throughput(16384, 0.5, 1e9, 989e12, flops_per_token_causal=0.6e9)
    assert both["mfu"] == out["mfu"] and both["mfu_causal"] == pytest.approx(0.6 * 32.768e12 / 989e12)
    assert both["tflops_causal"] == pytest.approx(0.6 * 32.768)
    assert throughput(16384, 0.5, 1e9, None)["mfu"] is None  # CPU / unknown device
    assert throughput(16384, 0.5, 1e9, None)["mfu_causal"] is None
    with pytest.raises(ValueError):
        throughput(16384, 0.0, 1e9, None)


def test_ratios_are_per_size_and_skip_failed_runs():
    runs = [
        {"size": "125M", "impl": "ours", "status": "ok", "tokens_per_s": 300.0},
        {"size": "125M", "impl": "eager", "status": "ok", "tokens_per_s": 200.0},
        {"size": "125M", "impl": "compiled", "status": "OOM"},
        {"size": "410M", "impl": "ours", "status": "ok", "tokens_per_s": 50.0},
        {"size": "410M", "impl": "eager", "status": "ok", "tokens_per_s": 100.0},
    ]
    add_ratios(runs, ["eager", "compiled"])
    assert runs[0]["ratio_vs_eager"] == pytest.approx(1.5)
    assert runs[0]["ratio_vs_compiled"] is None
    assert runs[1]["ratio_vs_eager"] == pytest.approx(1.0)
    assert runs[2]["ratio_vs_eager"] is None
    assert runs[3]["ratio_vs_eager"] == pytest.approx(0.5)
    assert ratio(1.0, 0.0) is None and ratio(None, 2.0) is None


def test_failed_run_renders_its_status():
    cells = row_cells({"size": "1.3B", "impl": "compiled", "status": "OOM", "error": "OutOfMemoryError: CUDA"},
                      ["eager", "compiled"])
    assert cells[0] == "HF GPTNeoX compiled" and cells[1] == "OOM"
    meta = {"device": "cuda", "seq": 2048, "micro_batch": 8, "date": "today", "commit": "abc", "env": {}}
    markdown = render_markdown(meta, [{"size": "1.3B", "impl": "compiled", "status": "OOM"}], ["eager"])
    assert "| 1.3B | HF GPTNeoX compiled | OOM |" in markdown


def test_set_values_are_yaml_scalars_and_dotted_keys_nest():
    overrides = parse_set(["torch_compile=true", "sdpa_backend=cudnn", "zero_optimization.stage=0",
                           "train-iters=10", "lr=1e-4", "peak_flops_per_device=null"])
    assert overrides == {"torch_compile": True, "sdpa_backend": "cudnn", "zero_optimization.stage": 0,
                         "train_iters": 10, "lr": 1e-4, "peak_flops_per_device": None}
    config = apply_overrides({"zero_optimization": {"stage": 1, "overlap_comm": True}}, overrides)
    assert config["zero_optimization"] == {"stage": 0, "overlap_comm": True}
    with pytest.raises(ValueError):
        parse_set(["no_equals_sign"])


def test_bench_config_precedence_size_config_then_fixed_keys_then_set():
    from bench_config import bench_config_dict

    spec = {"size": "1.3B", "device": "cuda", "seq": 1024, "micro_batch": 4, "steps": 3, "warmup": 2,
            "data_prefix": "/tmp/x", "cache_dir": "/tmp/c",
            "overrides": {"checkpoint_activations": False, "bf16.check_grad_overflow": False}}
    config = bench_config_dict(spec)
    assert (config["num_layers"], config["hidden_size"]) == (24, 2048)  # shape from configs/1-3B.yml
    assert config["zero_optimization"]["stage"] == 1
    assert (config["seq_length"], config["max_position_embeddings"]) == (1024, 1024)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 1)
    assert config["train_iters"] == 5 and config["data_path"] == "/tmp/x"
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert config["checkpoint_activations"] is False
    cpu = bench_config_dict(dict(spec, device="cpu", overrides={}))
    assert cpu["bf16"]["enabled"] is False and cpu["num_workers"] == 0


def test_kernel_breakdown_sums_per_step_by_category():
    from bench_timing import kernel_breakdown, kernel_category

    assert kernel_category("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
    assert kernel_category("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_0") == "attention"
    assert kernel_category("kernel_cutlass_kernel_quackgemm_sm90GemmSm90_object_at_0") == "matmul"
    assert kernel_category("triton_poi_fused_gelu_view_3") == "compiled (triton)"
    assert kernel_category("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>") == "copy / cast"
    assert kernel_category("some_custom_kernel") == "other"
    kernels = [("nvjet_a", 3000.0), ("nvjet_a", 1000.0), ("triton_poi_fused_gelu", 2000.0), ("xyz", 1000.0), ("xyz", 1000.0)]
    text = kernel_breakdown(kernels, steps=2)
    assert text.splitlines()[0] == "device time per step: 4.00 ms in 2 kernels"
    assert "  matmul                     2.00  50.0%            1" in text
    assert "  other                      1.00  25.0%            1" in text


def test_git_commit_names_this_checkout():
    import subprocess

    from bench_throughput import REPO_ROOT, git_commit

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert git_commit() in (head, head + "+dirty")


def test_kernel_gaps_buckets_idle_time_between_kernels():
    from bench_timing import kernel_gaps

    # two steps; overlapping kernels (a second stream) leave no gap; gaps of 5 us, 50 us and 2 ms
    kernels = [("k1", 0.0, 100.0), ("k2", 105.0, 200.0), ("nccl", 150.0, 300.0), ("k3", 350.0, 400.0),
               ("late", 2400.0, 2500.0)]
    text = kernel_gaps(kernels, steps=1)
    lines = text.splitlines()
    assert lines[0] == "device idle between kernels: 2.06 ms per step in 3 gaps"  # 5 + 50 + 2000 us
    assert lines[1].split() == ["<", "10", "us:", "0.01", "ms", "in", "1", "gaps"]
    assert lines[2].split() == ["10-100", "us:", "0.05", "ms", "in", "1", "gaps"]
    assert lines[3].split() == [">=", "100", "us:", "2.00", "ms", "in", "1", "gaps"]
    # the longest gap first, named by the kernels after and before it (the latest to end: nccl, not k2)
    assert lines[5].split() == ["2.000", "ms", "late", "<-", "k3"]
    assert lines[6].split() == ["0.050", "ms", "k3", "<-", "nccl"]
    assert lines[7].split() == ["0.005", "ms", "k2", "<-", "k1"]
    # gaps of 10 us and more summed per pair of kernels: the 5 us one is left out
    assert lines[8] == "  gaps >= 10 us summed by kernel pair (per step):"
    assert [line.split() for line in lines[9:]] == [["2.000", "ms", "1.0x", "late", "<-", "k3"],
                                                   ["0.050", "ms", "1.0x", "k3", "<-", "nccl"]]


def test_kernel_gaps_sums_repeated_pairs_per_step():
    from bench_timing import kernel_gaps

    # two steps, each with a 20 us gap from a to b; one 60 us gap from b to the second step's a
    kernels = [("a", 0.0, 10.0), ("b", 30.0, 40.0), ("a", 100.0, 110.0), ("b", 130.0, 140.0)]
    lines = kernel_gaps(kernels, steps=2).splitlines()
    assert [line.split() for line in lines[-2:]] == [["0.030", "ms", "0.5x", "a", "<-", "b"],
                                                    ["0.020", "ms", "1.0x", "b", "<-", "a"]]


def test_most_launched_counts_launches_per_step():
    from bench_timing import most_launched

    kernels = [("triton_a", 0, 1)] * 6 + [("nvjet_mm", 0, 1)] * 2
    text = most_launched(kernels, steps=2)
    lines = text.splitlines()
    assert lines[0] == "most launched kernels (per step, of 4):"
    assert lines[1].split() == ["3x", "[compiled", "(triton)]", "triton_a"]
    assert lines[2].split() == ["1x", "[matmul]", "nvjet_mm"]
