"""Long-sequence features through deepy.py on CPU: the memory levers (MLP chunks, checkpoint inputs kept in
host memory) give the plain run's loss curve; document-aware training (reset_attention_mask,
reset_position_ids, eod_mask_loss) runs through the data loader and trains (the fields reaching the model are
checked in tests/unit/data and tests/unit/training); both MFU figures are logged."""

import pytest

from tests.e2e.harness import losses, run_deepy


def test_levers_match_the_plain_run_and_documents_train(tmp_path):
    common = {"train_iters": 6, "checkpoint_activations": True}
    plain = losses(run_deepy(tmp_path, "plain", common))
    levers_records = run_deepy(tmp_path, "levers", {**common, "mlp_chunk_size": 24, "checkpoint_in_cpu": True})
    levers = losses(levers_records)
    assert sorted(levers) == list(range(1, 7))
    for step in plain:
        assert levers[step] == pytest.approx(plain[step], abs=1e-5), step
    assert all("tflops_per_device_causal" in r and r["tflops_per_device_causal"] < r["tflops_per_device"]
               for r in levers_records)

    docs = losses(run_deepy(tmp_path, "docs", {**common, "train_iters": 20, "reset_attention_mask": True,
                                               "reset_position_ids": True, "eod_mask_loss": True}))
    assert sum(docs[i] for i in (18, 19, 20)) / 3 < docs[1] - 1.0
