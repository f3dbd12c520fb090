"""Building the same GPTModel twice, single-process and tensor-parallel, a fixed batch for both, and the
comparisons of the parallel model against the single-process one."""

import torch

from megatron import mpu
from megatron.model import GPTModel


def reference_and_parallel(model_args, derived, state, seed: int = 7, **parallel_kwargs):
    """(single-process model, model on `state`'s tensor group) with identical initial weights: the init
    does not depend on the tensor-parallel size, so the same seed gives the same full weights.
    `parallel_kwargs` (e.g. checkpoint_activations) go to the parallel model only."""
    torch.manual_seed(seed)
    reference = GPTModel(model_args, derived, mpu.ParallelState.single())
    torch.manual_seed(seed)
    parallel = GPTModel(model_args, derived, state, **parallel_kwargs)
    return reference, parallel


def fixed_batch(vocab: int, batch: int = 2, seq: int = 16, seed: int = 3):
    """tokens, labels [batch, seq] and a loss mask with ~25% zeros; identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = (torch.rand(batch, seq, generator=gen) > 0.25).float()
    return tokens, labels, mask


def gathered_vocab_shards(logits: torch.Tensor, state) -> torch.Tensor:
    """This rank's logits `[..., V/tp]` -> the full `[..., V]`, all-gathered over the tensor group."""
    import torch.distributed as dist

    shards = [torch.empty_like(logits) for _ in range(state.tp_size)]
    dist.all_gather(shards, logits.detach().contiguous(), group=state.tp_group)
    return torch.cat(shards, dim=-1)


def assert_grads_match_reference(parallel, reference, state, msg: str = "", **tol) -> None:
    """Every parameter gradient of the parallel model equals the single-process model's: tensor-parallel
    parameters against their shard (`partition_dim`, this rank's piece), the others whole."""
    ref_params = dict(reference.named_parameters())
    for name, p in parallel.named_parameters():
        expected = ref_params[name].grad
        if getattr(p, "tensor_model_parallel", False):
            expected = expected.chunk(state.tp_size, dim=p.partition_dim)[state.tp_rank]
        torch.testing.assert_close(p.grad, expected, **tol, msg=f"{name} {msg}".strip())


def saved_layer_elements(model_args, derived, s: int = 64, b: int = 2) -> float:
    """Bytes of the unique storages autograd saves in the forward of layer 0 of a one-layer fp32 GPTModel on
    the CPU (parameters aside), in units of one `[s, b, h]` fp32 tensor: what the memory estimate's
    `layer_activation_elements` predicts."""
    model = GPTModel(model_args, derived, mpu.ParallelState.single())
    h = model_args.hidden_size
    x = torch.randn(s, b, h, requires_grad=True)
    params = {p.data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x)
    return sum(storages.values()) / (s * b * h * 4)
