"""The engine step hands a micro-batch's document fields to the engine: tensors on the device, max_seqlen as is."""

import torch

from megatron.engine.steps import EngineStep


def test_forward_loss_passes_document_fields():
    calls = []

    class Engine:
        device = torch.device("cpu")

        def __call__(self, *args, **kwargs):
            calls.append((args, kwargs))
            return torch.zeros(())

    tokens = torch.ones(1, 4, dtype=torch.long)
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(1, 4),
             "position_ids": torch.tensor([[0, 1, 0, 1]]), "cu_seqlens": torch.tensor([0, 2, 4], dtype=torch.int32),
             "max_seqlen": 2}
    EngineStep(None, None, 1)._forward_loss(Engine(), batch)
    args, kwargs = calls[0]
    assert len(args) == 3 and set(kwargs) == {"position_ids", "cu_seqlens", "max_seqlen"}
    assert kwargs["max_seqlen"] == 2 and kwargs["cu_seqlens"].tolist() == [0, 2, 4]
    EngineStep(None, None, 1)._forward_loss(Engine(), {k: batch[k] for k in ("tokens", "labels", "loss_mask")})
    assert calls[1][1] == {}
