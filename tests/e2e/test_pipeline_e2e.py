"""Pipeline parallelism through deepy.py (2 CPU ranks, gloo, fp32): PP=2 trains to the PP=1 run's loss and
grad norm at every step from the same seed (the initial weights do not depend on the layout), logs one
record per step (loss broadcast from the last stage, throughput counted once), evaluates, and saves a
pipeline checkpoint whose merged weights have the PP=1 model's keys and shapes."""

import math

from tests.e2e.harness import losses, read_metrics, run_deepy

STEPS = 4
BASE = {"num_layers": 2, "train_iters": STEPS, "eval_interval": 2, "eval_iters": 1}
# fp32: the stages change no sum of the forward; the grad norm is summed per stage, then over the stages
REL_TOL = 2e-5


def test_pp2_matches_pp1_and_logs_once_per_step(tmp_path):
    from megatron.checkpointing.reshard import read_merged_model_state

    pp1 = run_deepy(tmp_path, "pp1", {**BASE, "save": str(tmp_path / "pp1_ckpt")})
    pp2 = run_deepy(tmp_path, "pp2", {**BASE, "pipe_parallel_size": 2, "num_gpus": 2,
                                      "save": str(tmp_path / "pp2_ckpt")})

    assert [r["iteration"] for r in pp2] == list(range(1, STEPS + 1))  # once per step, not once per stage
    reference, curve = losses(pp1), losses(pp2)
    for step in range(1, STEPS + 1):
        assert math.isclose(curve[step], reference[step], rel_tol=REL_TOL), (step, curve[step], reference[step])
    for record, ref_record in zip(pp2, pp1):
        assert math.isclose(record["grad_norm"], ref_record["grad_norm"], rel_tol=REL_TOL)
        assert record["tokens_per_s"] > 0 and record["tflops_per_device"] > 0
    assert curve[STEPS] < curve[1]
    evals = read_metrics(str(tmp_path / "run_pp2"), "eval")
    ref_evals = read_metrics(str(tmp_path / "run_pp1"), "eval")
    assert len(evals) == len(ref_evals) >= 1
    for record, ref_record in zip(evals, ref_evals):
        assert math.isclose(record["loss"], ref_record["loss"], rel_tol=REL_TOL)

    full, args = read_merged_model_state(str(tmp_path / "pp2_ckpt"))
    ref_full, _ = read_merged_model_state(str(tmp_path / "pp1_ckpt"))
    assert args.parallel.pipe_parallel_size == 2
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in ref_full.items()}
    for key, value in full.items():
        assert (value - ref_full[key]).abs().max() < 1e-4, key
