"""Building the same GPTModel twice, single-process and tensor-parallel, and a fixed batch for both."""

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
