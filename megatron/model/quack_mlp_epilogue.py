"""fc2's data gradient with GELU's derivative and fc1's bias gradient in the GEMM's epilogue (quack-kernels).

Imported only where quack and the CuTe DSL import (a CUDA machine, `megatron/model/fused_mlp.py`). The
epilogue sees each element of the accumulator acc = (dY W2)[t, j] = dZ[t, j] and the saved preactivation
c = P[t, j], and stores

    D       = dP[t, j] = gelu'(P[t, j]) * dZ[t, j]       fc1's output gradient              [T, f]
    postact = Z[t, j]  = gelu(P[t, j])                   recomputed: fc2's weight gradient's input [T, f]
    dbias   = sum_t dP[t, j]                             fc1's bias gradient (a row reduce)  [f]

quack's library has this mod for the tanh GELU only (`dgelu_dbias_mod`); these are the same for both
GELUs. They are module globals so that quack's compile workers and disk cache find them by import.
"""

from __future__ import annotations

from quack.activation import dgelu_erf, dgelu_tanh_approx
from quack.epilogue import gemm_epilogue
from quack.epilogue.ops import RowVecReduce


@gemm_epilogue(outputs=("postact",), reduces={"dbias": RowVecReduce("dbias")})
def dgelu_erf_dbias(acc, c):
    """exact GELU: gelu'(x) = Phi(x) + x phi(x)."""
    dx, out = dgelu_erf(c, acc)
    return {"D": dx, "postact": out, "dbias": dx}


@gemm_epilogue(outputs=("postact",), reduces={"dbias": RowVecReduce("dbias")})
def dgelu_tanh_dbias(acc, c):
    """tanh GELU (`bias_gelu_fusion: true`)."""
    dx, out = dgelu_tanh_approx(c, acc)
    return {"D": dx, "postact": out, "dbias": dx}


DGELU_DBIAS = {"gelu_erf": dgelu_erf_dbias, "gelu_tanh_approx": dgelu_tanh_dbias}
"""quack's activation name -> the epilogue mod with the bias-gradient reduce."""
