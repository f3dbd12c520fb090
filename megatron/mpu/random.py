"""RNG streams for tensor parallelism, and activation checkpointing that replays them.

Two streams:
  - the default torch generator (CPU, and CUDA when available), seeded with `seed` on every tensor
    rank: used for dropout on replicated activations, which must be identical across tensor ranks (the
    weights draw from their own generators keyed by this seed: megatron/model/init.py);
  - the tracker's `model_parallel_rng` fork, seeded with `seed + 2718 + tp_rank`: used (via
    `get_rng_tracker().fork()`) for dropout on tensor-sharded activations (e.g. attention probs of
    the local heads), which must differ across tensor ranks.

`checkpoint(fn, *args)` recomputes `fn` in backward with the default RNG state AND the tracker's
states restored to what they were in the forward, so recomputed dropout masks are identical.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.utils.checkpoint

MODEL_PARALLEL_RNG = "model_parallel_rng"
MODEL_PARALLEL_SEED_OFFSET = 2718

# (cpu state, cuda state of the current device or None)
RNGState = Tuple[torch.Tensor, Optional[torch.Tensor]]


def _get_rng_state() -> RNGState:
    cuda_state = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda_state


def _set_rng_state(state: RNGState) -> None:
    cpu_state, cuda_state = state
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state)


class RNGStatesTracker:
    """Named RNG streams that can be entered with `fork(name)`.

    Each stream is a saved (CPU, CUDA) generator state. `fork` swaps it in, runs the block, saves
    the advanced state back and restores the caller's state, so the default stream is untouched.
    """

    def __init__(self) -> None:
        self._states: Dict[str, RNGState] = {}
        self._seeds: Dict[str, int] = {}

    def reset(self) -> None:
        self._states.clear()
        self._seeds.clear()

    def add(self, name: str, seed: int) -> None:
        """Create stream `name` seeded with `seed` (each name and seed may be used once)."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists; call reset() first.")
        if seed in self._seeds.values():
            raise ValueError(f"seed {seed} is already used by another RNG stream.")
        saved = _get_rng_state()
        try:
            torch.manual_seed(seed)  # seeds CPU and every CUDA device
            self._states[name] = _get_rng_state()
        finally:
            _set_rng_state(saved)
        self._seeds[name] = seed

    def get_states(self) -> Dict[str, RNGState]:
        """A copy of every stream's state (for checkpoints and recomputation)."""
        return {name: (cpu.clone(), None if cuda is None else cuda.clone())
                for name, (cpu, cuda) in self._states.items()}

    def set_states(self, states: Dict[str, RNGState]) -> None:
        """Replace every stream's state (the seeds bookkeeping is kept)."""
        self._states = {name: (cpu.clone(), None if cuda is None else cuda.clone())
                        for name, (cpu, cuda) in states.items()}

    def has(self, name: str) -> bool:
        return name in self._states

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Run the block with stream `name` as the default generator state."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added; call model_parallel_seed(seed, state) "
                           f"before building or running the model.")
        caller_state = _get_rng_state()
        _set_rng_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_rng_state()
            _set_rng_state(caller_state)


_RNG_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (one per process, like torch's default generator)."""
    return _RNG_TRACKER


def model_parallel_seed(seed: int, state: Any, tracker: Optional[RNGStatesTracker] = None) -> None:
    """Seed the default generator with `seed` (same on all tensor ranks) and the tracker's
    `model_parallel_rng` stream with `seed + 2718 + tp_rank` (different per tensor rank).

    `state` is a `ParallelState`. The tracker is reset first, so calling this twice is safe.
    """
    tracker = tracker if tracker is not None else _RNG_TRACKER
    torch.manual_seed(seed)
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, seed + MODEL_PARALLEL_SEED_OFFSET + state.tp_rank)


def checkpoint(fn: Callable, *args, tracker: Optional[RNGStatesTracker] = None, partition_group=None):
    """Activation checkpointing: run `fn(*args)` without keeping its activations; recompute in backward.

    The recompute sees the same default RNG state (CPU and CUDA, via torch's `preserve_rng_state`)
    and the same tracker stream states as the original forward, so dropout masks are identical;
    the tracker's states after the recompute are put back to what they were before it.
    Built on `torch.utils.checkpoint.checkpoint(use_reentrant=False)`: inputs need not require grad,
    and outputs may be tensors or tuples of tensors.

    `partition_group` (GPT-NeoX's partition_activations): the first argument `x` `[..., h]`, replicated on
    the ranks of that tensor-parallel group, is kept between forward and backward only as this rank's slice
    `x_r = x[..., r*h/p:(r+1)*h/p]` (scatter_to_tensor_parallel_region: backward all-gathers the gradient)
    and all-gathered back to `[..., h]` inside the checkpointed function (forward and recompute;
    gather_from_tensor_parallel_region: backward keeps this rank's slice of the replicated gradient).
    Values and gradients are unchanged; the checkpoint holds 1/p of `x`.
    """
    from megatron.mpu.mappings import gather_from_tensor_parallel_region, group_size, \
        scatter_to_tensor_parallel_region

    if partition_group is not None and group_size(partition_group) > 1:
        def gathered(x_local, *rest):
            return fn(gather_from_tensor_parallel_region(x_local, partition_group), *rest)

        x_local = scatter_to_tensor_parallel_region(args[0], partition_group)  # [..., h/p], a copy
        return checkpoint(gathered, x_local, *args[1:], tracker=tracker)
    tracker = tracker if tracker is not None else _RNG_TRACKER
    forward_tracker_states = tracker.get_states()
    calls = {"n": 0}

    def run(*inner_args):
        calls["n"] += 1
        if calls["n"] == 1:  # the real forward: advance the tracker normally
            return fn(*inner_args)
        states_before_recompute = tracker.get_states()
        tracker.set_states(forward_tracker_states)
        try:
            return fn(*inner_args)
        finally:
            tracker.set_states(states_before_recompute)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
