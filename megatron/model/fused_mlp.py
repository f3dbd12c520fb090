"""The GELU and SwiGLU MLPs with their activation inside quack's GEMM epilogues (`mlp_impl: quack`).

Per rank, on the T = s*b tokens of x, hidden h and this rank's MLP width f (fc1's column shard W1 `[f, h]`,
b1 `[f]`, and fc2's row shard W2 `[h, f]`; the input mapping, the tensor-parallel reduction and fc2's bias
stay ParallelMLP's, as for the unfused layer):

    forward   P = X W1ᵀ + b1,  Z = gelu(P)        one quack GEMM; its epilogue stores P and Z   [T, f] each
              Y = Z W2ᵀ                            cuBLAS: this rank's partial sum               [T, h]
    saved     X, P                                 (not Z: backward's epilogue recomputes it)
    backward  dP = gelu'(P) * (dY W2),  Z = gelu(P),  db1 = sum_t dP
                                                   one quack GEMM (megatron/model/quack_mlp_epilogue.py)
              dW2 = dYᵀ Z,  dX = dP W1,  dW1 = dPᵀ X              cuBLAS

The unfused layer runs the same GEMMs on cuBLAS with a compiled GELU kernel after fc1 (read P, write Z) and
another after fc2's data gradient (read dZ and P, write dP, sum db1), and keeps Z for fc2's weight
gradient. Fused, those passes become the epilogue's stores and loads of tiles it already holds, and one
`[T, f]` tensor per layer less is kept for backward.

SwiGLU (no biases; W_gate, W_up `[f, h]`, Llama's gate_proj and up_proj):

    forward   P = X [W_gate; W_up]ᵀ  (columns interleaved: P[:, 2j] = gate_j, P[:, 2j+1] = up_j)    [T, 2f]
              Z = silu(gate) * up                   one quack gated GEMM; its epilogue stores P and Z  [T, f]
              Y = Z W2ᵀ                             cuBLAS                                            [T, h]
    saved     X, P
    backward  dP = (dgate, dup) interleaved, with dZ = dY W2: dgate = dZ up silu'(gate), dup = dZ silu(gate);
              Z recomputed                          one quack GEMM (gemm_dgated)
              dW2 = dYᵀ Z                           cuBLAS
              dX = dgate W_gate + dup W_up,  [dW_gate; dW_up] = [dgateᵀ X; dupᵀ X]
                                                    two quack GEMMs that read P's interleaved columns as the
                                                    [gate; up] concatenation (`concat_layout`)

quack reads the two weights as one `[gate; up]` matrix: a copy of the 2 f h weights per call, not of any
activation. The unfused layer keeps gate, up, silu(gate) and Z; this one keeps P (gate and up) only.

The kernels are torch custom ops (`neox::gelu_fc1`, `neox::dgelu_fc2_dgrad`, `neox::swiglu_fc1`,
`neox::dswiglu_fc2_dgrad`, `neox::swiglu_fc1_grads`): a compiled layer calls them as opaque nodes, without a
graph break. On CUDA they run quack's kernels; elsewhere the same math in
torch, so that the composite's wiring and gradients are tested on the CPU against the unfused layer
(`mlp_impl: quack` itself is refused off CUDA: megatron/model/mlp_support.py).

GELU is exact (erf: quack's `gelu_erf`) or, with `bias_gelu_fusion: true`, the tanh approximation
(`gelu_tanh_approx`): the same function as the unfused layer computes either way. In bf16 the epilogue applies
GELU to the fp32 accumulator (the unfused layer to P rounded to bf16): the two agree within bf16 rounding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

QUACK_GELU = {"none": "gelu_erf", "tanh": "gelu_tanh_approx"}
"""ParallelMLP's `gelu_approximate` ("none": erf, "tanh") -> quack's activation name."""


def _fc1_reference(x: Tensor, w1: Tensor, b1: Optional[Tensor], approximate: str) -> tuple[Tensor, Tensor]:
    """(P, Z) in fp32 arithmetic, rounded to x's dtype, as the epilogue does."""
    p = F.linear(x.float(), w1.float(), None if b1 is None else b1.float())
    return p.to(x.dtype), F.gelu(p, approximate=approximate).to(x.dtype)


def _dgrad_reference(dy: Tensor, w2: Tensor, preact: Tensor, approximate: str,
                     bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dP, Z, db1) in fp32 arithmetic; dP and Z rounded to dy's dtype, db1 in fp32 (empty without a bias)."""
    dz, p = dy.float() @ w2.float(), preact.float()
    dp = torch.ops.aten.gelu_backward(dz, p, approximate=approximate)
    db1 = dp.sum(0) if bias_grad else dp.new_empty(0)
    return dp.to(dy.dtype), F.gelu(p, approximate=approximate).to(dy.dtype), db1


@torch.library.custom_op("neox::gelu_fc1", mutates_args=())
def gelu_fc1(x: Tensor, w1: Tensor, b1: Optional[Tensor], approximate: str, tuned: bool) -> tuple[Tensor, Tensor]:
    """x `[T, h]`, W1 `[f, h]`, b1 `[f]` -> (P, Z = gelu(P)), `[T, f]` each. `tuned`: quack autotunes the shape
    on first sight (`mlp_autotune`) instead of taking its per-arch default config."""
    if not x.is_cuda:
        return _fc1_reference(x, w1, b1, approximate)
    from quack.gemm_interface import gemm_act

    preact, postact = gemm_act(x, w1.t(), bias=b1, activation=QUACK_GELU[approximate], tuned=tuned)
    return preact, postact


@gelu_fc1.register_fake
def _(x, w1, b1, approximate, tuned):
    shape = (x.shape[0], w1.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("neox::dgelu_fc2_dgrad", mutates_args=())
def dgelu_fc2_dgrad(dy: Tensor, w2: Tensor, preact: Tensor, approximate: str, bias_grad: bool,
                    tuned: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dY `[T, h]`, W2 `[h, f]`, P `[T, f]` -> (dP `[T, f]`, Z `[T, f]`, db1 `[f]` fp32, or empty)."""
    if not dy.is_cuda:
        return _dgrad_reference(dy, w2, preact, approximate, bias_grad)
    activation = QUACK_GELU[approximate]
    if not bias_grad:
        from quack.gemm_interface import gemm_dact

        dp, z = gemm_dact(dy, w2, preact, activation=activation, tuned=tuned)
        return dp, z, dy.new_empty(0, dtype=torch.float32)
    from megatron.model.quack_mlp_epilogue import DGELU_DBIAS

    out = DGELU_DBIAS[activation](dy, w2, preact, out={"D": torch.empty_like(preact),
                                                        "postact": torch.empty_like(preact)},
                                  tuned=tuned, dynamic_scheduler=True)
    return out["D"], out["postact"], out["dbias"].reshape(-1).float()


@dgelu_fc2_dgrad.register_fake
def _(dy, w2, preact, approximate, bias_grad, tuned):
    return (torch.empty_like(preact), torch.empty_like(preact),
            preact.new_empty(preact.shape[1] if bias_grad else 0, dtype=torch.float32))


def interleave(gate: Tensor, up: Tensor) -> Tensor:
    """[T, f] gate and up -> [T, 2f] with column 2j = gate[:, j], 2j+1 = up[:, j]: quack's layout of a gated
    preactivation (and of its gradient)."""
    return torch.stack((gate, up), dim=-1).flatten(-2)


def _swiglu_fc1_reference(x: Tensor, w_gate: Tensor, w_up: Tensor) -> tuple[Tensor, Tensor]:
    """(P interleaved [T, 2f], Z = silu(gate) * up [T, f]) in fp32 arithmetic, rounded to x's dtype."""
    gate, up = F.linear(x.float(), w_gate.float()), F.linear(x.float(), w_up.float())
    return interleave(gate, up).to(x.dtype), (F.silu(gate) * up).to(x.dtype)


def _dswiglu_reference(dy: Tensor, w2: Tensor, preact: Tensor) -> tuple[Tensor, Tensor]:
    """(dP interleaved [T, 2f], Z [T, f]): dgate = dZ up silu'(gate), dup = dZ silu(gate), dZ = dY W2."""
    dz, gate, up = dy.float() @ w2.float(), preact[:, 0::2].float(), preact[:, 1::2].float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_gate = dz * up * (sig * (1 + gate * (1 - sig)))  # silu'(g) = s (1 + g (1 - s))
    return interleave(d_gate, dz * silu).to(dy.dtype), (silu * up).to(dy.dtype)


def _swiglu_fc1_grads_reference(dpreact: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor) -> tuple[Tensor, Tensor]:
    """(dX, [dW_gate; dW_up]) from the interleaved dP, in fp32 arithmetic rounded to the inputs' dtypes."""
    d_gate, d_up = dpreact[:, 0::2].float(), dpreact[:, 1::2].float()
    dx = d_gate @ w_gate.float() + d_up @ w_up.float()
    return dx.to(x.dtype), torch.cat((d_gate.t() @ x.float(), d_up.t() @ x.float())).to(w_gate.dtype)


@torch.library.custom_op("neox::swiglu_fc1", mutates_args=())
def swiglu_fc1(x: Tensor, w_gate: Tensor, w_up: Tensor, tuned: bool) -> tuple[Tensor, Tensor]:
    """x `[T, h]`, gate and up weights `[f, h]` each -> (P `[T, 2f]` interleaved, Z = silu(gate) * up `[T, f]`).
    quack reads the two weights as one `[gate; up]` matrix (`concat_layout`: a copy of 2 f h, not of P)."""
    if not x.is_cuda:
        return _swiglu_fc1_reference(x, w_gate, w_up)
    from quack.gemm_interface import gemm_gated

    w_cat = torch.cat((w_gate, w_up), dim=0)  # [2f, h]; its transpose's N dim is [gate | up]
    preact, postact = gemm_gated(x, w_cat.t(), activation="swiglu", concat_layout=("B",), tuned=tuned)
    return preact, postact


@swiglu_fc1.register_fake
def _(x, w_gate, w_up, tuned):
    return x.new_empty(x.shape[0], 2 * w_gate.shape[0]), x.new_empty(x.shape[0], w_gate.shape[0])


@torch.library.custom_op("neox::dswiglu_fc2_dgrad", mutates_args=())
def dswiglu_fc2_dgrad(dy: Tensor, w2: Tensor, preact: Tensor, tuned: bool) -> tuple[Tensor, Tensor]:
    """dY `[T, h]`, W2 `[h, f]`, P `[T, 2f]` interleaved -> (dP `[T, 2f]` interleaved, Z `[T, f]` recomputed)."""
    if not dy.is_cuda:
        return _dswiglu_reference(dy, w2, preact)
    from quack.gemm_interface import gemm_dgated

    dpreact, postact = gemm_dgated(dy, w2, preact, activation="swiglu", tuned=tuned)
    return dpreact, postact


@dswiglu_fc2_dgrad.register_fake
def _(dy, w2, preact, tuned):
    return torch.empty_like(preact), preact.new_empty(preact.shape[0], preact.shape[1] // 2)


@torch.library.custom_op("neox::swiglu_fc1_grads", mutates_args=())
def swiglu_fc1_grads(dpreact: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor,
                     tuned: bool) -> tuple[Tensor, Tensor]:
    """dP `[T, 2f]` interleaved -> (dX = dgate W_gate + dup W_up `[T, h]`, [dW_gate; dW_up] = [dgateᵀ X; dupᵀ X]
    `[2f, h]`): two quack GEMMs that read dP's interleaved columns as the concatenation they stand for."""
    if not dpreact.is_cuda:
        return _swiglu_fc1_grads_reference(dpreact, x, w_gate, w_up)
    from quack.gemm_interface import gemm

    w_cat = torch.cat((w_gate, w_up), dim=0)  # [2f, h]: its K dim (rows) is [gate; up]
    dx = gemm(dpreact, w_cat, concat_layout=("B",), dynamic_scheduler=True, tuned=tuned)
    dw_cat = gemm(dpreact.t(), x, concat_layout=("out",), out_dtype=w_gate.dtype, dynamic_scheduler=True,
                  tuned=tuned)
    return dx, dw_cat


@swiglu_fc1_grads.register_fake
def _(dpreact, x, w_gate, w_up, tuned):
    return torch.empty_like(x), w_gate.new_empty(2 * w_gate.shape[0], w_gate.shape[1])


class _GeluMLP(torch.autograd.Function):
    """Y = gelu(X W1ᵀ + b1) W2ᵀ on `[T, h]` tokens (module docstring)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, approximate: str, tuned: bool):
        preact, postact = torch.ops.neox.gelu_fc1(x, w1, b1, approximate, tuned)  # [T, f] each
        ctx.save_for_backward(x, w1, w2, preact)
        ctx.approximate, ctx.has_bias, ctx.tuned = approximate, b1 is not None, tuned
        return F.linear(postact, w2)  # [T, h]

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, preact = ctx.saved_tensors
        dy = dy.contiguous()  # [T, h]
        dpreact, postact, db1 = torch.ops.neox.dgelu_fc2_dgrad(dy, w2, preact, ctx.approximate, ctx.has_bias,
                                                               ctx.tuned)
        dw2 = dy.t() @ postact  # [h, f]
        dx = dpreact @ w1  # [T, h]
        dw1 = dpreact.t() @ x  # [f, h]
        return dx, dw1, db1.to(w1.dtype) if ctx.has_bias else None, dw2, None, None


class _SwiGLUMLP(torch.autograd.Function):
    """Y = (silu(X W_gateᵀ) * X W_upᵀ) W2ᵀ on `[T, h]` tokens (module docstring)."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w2, tuned: bool):
        preact, postact = torch.ops.neox.swiglu_fc1(x, w_gate, w_up, tuned)  # [T, 2f] interleaved, [T, f]
        ctx.save_for_backward(x, w_gate, w_up, w2, preact)
        ctx.tuned = tuned
        return F.linear(postact, w2)  # [T, h]

    @staticmethod
    def backward(ctx, dy):
        x, w_gate, w_up, w2, preact = ctx.saved_tensors
        dy = dy.contiguous()  # [T, h]
        dpreact, postact = torch.ops.neox.dswiglu_fc2_dgrad(dy, w2, preact, ctx.tuned)
        dw2 = dy.t() @ postact  # [h, f]
        dx, dw_cat = torch.ops.neox.swiglu_fc1_grads(dpreact, x, w_gate, w_up, ctx.tuned)
        dw_gate, dw_up = dw_cat.chunk(2, dim=0)  # [f, h] each, rows of one buffer
        return dx, dw_gate, dw_up, dw2, None


def swiglu_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w2: Tensor, tuned: bool = False) -> Tensor:
    """x `[..., h]` -> this rank's partial fc2 output `[..., h]` of the SwiGLU MLP (no biases)."""
    y = _SwiGLUMLP.apply(x.reshape(-1, x.shape[-1]), w_gate, w_up, w2, tuned)
    return y.view(*x.shape[:-1], w2.shape[0])


def gelu_mlp(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, approximate: str, tuned: bool = False) -> Tensor:
    """x `[..., h]` -> this rank's partial fc2 output `[..., h]` (before the reduction and fc2's bias);
    `tuned`: quack autotunes its two GEMM shapes on first sight (`mlp_autotune`)."""
    if approximate not in QUACK_GELU:
        raise ValueError(f"gelu_mlp: approximate must be one of {sorted(QUACK_GELU)}, got {approximate!r}")
    y = _GeluMLP.apply(x.reshape(-1, x.shape[-1]), w1, b1, w2, approximate, tuned)
    return y.view(*x.shape[:-1], w2.shape[0])
