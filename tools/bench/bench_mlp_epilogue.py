"""The MLP's activation fused into its GEMMs' epilogues (quack-kernels, CuTe DSL) against cuBLAS plus a
separate elementwise kernel: the first measurement the fusion lever of issue 15 needs (docs/PERFORMANCE.md).

    python tools/bench/bench_mlp_epilogue.py --sizes 410M,llama-1B --seq 2048 --micro-batch 8 [--out f.json]

Per layer, for T = micro-batch x seq tokens, hidden h and MLP width f, both sides do the same work:

    forward   fc1  P = X W1ᵀ (+ b1)   [T, f] (gated: [T, 2f], gate and up)   then Z = act(P)
    backward  fc2's dgrad dZ = dY W2   [T, f]                                 then dP = act'(P) * dZ

- unfused (what a compiled layer runs today): cuBLAS (`torch.matmul`; the bias through `addmm`; for a gated
  MLP two GEMMs, gate and up, as `linear_gate` and `linear_fc1` are) and one compiled elementwise kernel
  (torch.compile of act / act').
- fused: `quack.gemm_interface.gemm_act` (stores P and Z from the epilogue) and `gemm_dact` (reads P in the
  epilogue, writes dP and Z); a gated MLP's gate and up are one interleaved weight there.
- the GEMMs alone: cuBLAS and quack's plain `gemm` on the same shapes, to tell GEMM speed from fusion.
- host (`--host-tokens N`): each call's host cost, issued back to back at N tokens (cuBLAS, quack direct,
  our custom ops), to tell a launch-bound step from a kernel-bound one.
- ours: the custom ops `mlp_impl: quack` runs (megatron/model/fused_mlp.py). GELU: fc1 and fc2's dgrad, which
  also sums fc1's bias gradient in its epilogue (the unfused side's act' kernel then includes that sum). SwiGLU:
  fc1 (gate and up read as one concatenated weight), fc2's dgrad, and fc1's dX and dW from the interleaved dP
  (against cuBLAS on the contiguous halves, as the two column-parallel layers run them).

GELU is the model's own on both sides: exact (erf, quack's `gelu_erf`) or, with `bias_gelu_fusion: true`, the
tanh approximation (`gelu_tanh_approx`). Before timing, each fused output is compared with the unfused one (relative error
printed; bf16). The fused side needs CUDA and quack (`../shared/gpu/make-cute-wheels.sh`); without them only
the unfused side runs (`--fused` makes their absence an error).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gemm import _time, bench_args, kernel_bench_parser, write_reports  # noqa: E402

GATED = {"swiglu": "swiglu"}
"""our activation -> quack's gated activation of the same function (silu(gate) * up)."""


def quack_activation(model) -> str:
    """quack's name of the model's MLP activation: swiglu, gelu_erf (exact) or gelu_tanh_approx."""
    if model.activation in GATED:
        return GATED[model.activation]
    if model.activation != "gelu":
        raise SystemExit(f"bench_mlp_epilogue: activation {model.activation!r} is not timed here (gelu, swiglu)")
    return "gelu_tanh_approx" if model.bias_gelu_fusion else "gelu_erf"


def mlp_shape(args) -> dict:
    """T-independent facts of the MLP: hidden, width per branch, gated, bias, layers."""
    model = args.model
    return {"hidden": model.hidden_size, "width": args.derived.intermediate_size,
            "gated": model.activation in GATED, "bias": bool(model.use_bias_in_mlp) and model.activation not in GATED,
            "layers": model.num_layers, "activation": quack_activation(model)}


def _approximate(activation: str) -> str:
    return "tanh" if activation == "gelu_tanh_approx" else "none"


def act_forward(p, activation: str):
    """Z = act(P): GELU of [T, f], or silu(gate) * up of P = [gate | up] ([T, 2f], halves) for swiglu."""
    import torch.nn.functional as F

    if activation in GATED.values():
        gate, up = p.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(p, approximate=_approximate(activation))


def act_backward(dz, p, activation: str):
    """dP = act'(P) * dZ for `act_forward` (gated: [d gate | d up])."""
    import torch

    if activation in GATED.values():
        gate, up = p.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        d_gate = dz * up * (sig * (1 + gate * (1 - sig)))  # silu'(g) = s (1 + g (1 - s))
        return torch.cat((d_gate, dz * silu), dim=-1)
    return torch.ops.aten.gelu_backward(dz, p, approximate=_approximate(activation))


def interleave_halves(t, dim: int):
    """[a | b] along `dim` (halves) -> a_0, b_0, a_1, b_1, ...: quack's gated layout of the gate and up
    columns (of the fc1 weight along its rows, dim 0, and of the preact along its columns, dim -1)."""
    import torch

    a, b = t.chunk(2, dim=dim)
    dim = dim % t.dim()
    return torch.stack((a, b), dim=dim + 1).flatten(dim, dim + 1)


def import_quack(required: bool):
    """quack.gemm_interface, or None when it does not import and `required` is False."""
    try:
        from quack import gemm_interface
    except Exception as error:  # ImportError, or the CuTe DSL failing to load its libraries
        if required:
            raise SystemExit(f"--fused needs quack-kernels and the CuTe DSL on a CUDA machine "
                             f"(../shared/gpu/make-cute-wheels.sh): {type(error).__name__}: {error}")
        return None
    return gemm_interface


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def layer_report(shape: dict, tokens: int, warmup: int, iters: int, device, quack=None, tuned: bool = False) -> dict:
    """ms per layer of each side (module docstring) and, with quack, the fused outputs' relative errors.
    `tuned`: quack autotunes each shape first (compiles several kernels) instead of its default config."""
    import torch

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    h, f, gated, activation = shape["hidden"], shape["width"], shape["gated"], shape["activation"]
    branches = 2 if gated else 1

    def rand(*size, scale=1.0):
        return torch.randn(*size, dtype=dtype, device=device) * scale

    x, dy = rand(tokens, h), rand(tokens, h)
    w1 = rand(branches * f, h, scale=h ** -0.5)  # [gate | up] rows when gated (linear_gate, linear_fc1)
    w2 = rand(h, f, scale=f ** -0.5)  # fc2.weight [out=h, in=f]
    b1 = rand(f) if shape["bias"] else None
    forward_act = torch.compile(act_forward) if cuda else act_forward
    backward_act = torch.compile(act_backward) if cuda else act_backward

    def act_backward_and_bias(dz, p, activation):  # dP and, with fc1's bias, its gradient sum_t dP
        dp = act_backward(dz, p, activation)
        return (dp, dp.sum(0)) if b1 is not None else (dp,)

    backward_act_bias = torch.compile(act_backward_and_bias) if cuda else act_backward_and_bias
    weights_1 = w1.chunk(branches, dim=0)

    def fc1():  # the GEMMs the model runs for fc1 (and the gate): [gate, up] or [P]
        return [torch.addmm(b1, x, w.t()) if b1 is not None else x @ w.t() for w in weights_1]

    p = torch.cat(fc1(), dim=-1)  # [T, f] or [T, gate | up]
    dz = dy @ w2
    report = {"tokens": tokens, "unfused": {
        "forward_gemm_ms": _time(fc1, warmup, iters, device),
        "forward_act_ms": _time(lambda: forward_act(p, activation), warmup, iters, device),
        "dgrad_gemm_ms": _time(lambda: dy @ w2, warmup, iters, device),
        "dgrad_act_ms": _time(lambda: backward_act_bias(dz, p, activation), warmup, iters, device),
    }}
    unfused = report["unfused"]
    unfused["forward_ms"] = unfused["forward_gemm_ms"] + unfused["forward_act_ms"]
    unfused["dgrad_ms"] = unfused["dgrad_gemm_ms"] + unfused["dgrad_act_ms"]
    if quack is None:
        return report

    if gated:  # quack pairs gate and up by adjacent columns of B [h, 2f] (and of P): gate_0, up_0, gate_1, ...
        b_fc1, p_fused, dp_ref = interleave_halves(w1, 0).t(), interleave_halves(p, -1), interleave_halves(
            backward_act(dz, p, activation), -1)
    else:
        b_fc1, p_fused, dp_ref = w1.t(), p, backward_act(dz, p, activation)
    p_fused = p_fused.contiguous()

    def fused_forward():
        return quack.gemm_act(x, b_fc1, bias=b1, activation=activation, tuned=tuned)

    def fused_dgrad():
        return quack.gemm_dact(dy, w2, p_fused, activation=activation, tuned=tuned)

    preact, postact = fused_forward()
    dpreact, _ = fused_dgrad()
    report["fused_relative_error"] = {"preact": _rel(preact, p_fused), "postact": _rel(postact, forward_act(p, activation)),
                                      "dpreact": _rel(dpreact, dp_ref)}
    report["fused"] = {"forward_ms": _time(fused_forward, warmup, iters, device),
                       "dgrad_ms": _time(fused_dgrad, warmup, iters, device)}
    if not gated:  # the product's two custom ops (megatron/model/fused_mlp.py): fc1's bias gradient included
        from megatron.model.fused_mlp import QUACK_GELU

        approximate = {v: k for k, v in QUACK_GELU.items()}[activation]
        ours = torch.ops.neox.dgelu_fc2_dgrad(dy, w2, p, approximate, b1 is not None, tuned)
        report["fused_relative_error"]["ours_dpreact"] = _rel(ours[0], dp_ref)
        if b1 is not None:
            report["fused_relative_error"]["ours_dbias"] = _rel(ours[2], dp_ref.float().sum(0))
        report["ours"] = {
            "forward_ms": _time(lambda: torch.ops.neox.gelu_fc1(x, w1, b1, approximate, tuned), warmup, iters,
                                device),
            "dgrad_ms": _time(lambda: torch.ops.neox.dgelu_fc2_dgrad(dy, w2, p, approximate, b1 is not None, tuned),
                              warmup, iters, device)}
    else:  # the SwiGLU custom ops: fc1 (gate and up as one concatenated weight), fc2's dgrad, and fc1's dX, dW
        w_gate, w_up = weights_1
        dp_fused = torch.ops.neox.dswiglu_fc2_dgrad(dy, w2, p_fused, tuned)[0]
        report["fused_relative_error"]["ours_dpreact"] = _rel(dp_fused, dp_ref)
        d_gate, d_up = backward_act(dz, p, activation).chunk(2, dim=-1)  # contiguous halves, for cuBLAS

        def fc1_grads_unfused():  # what the two ColumnParallelLinears' backward runs: dX summed, dW each
            return d_gate @ w_gate + d_up @ w_up, d_gate.t() @ x, d_up.t() @ x

        report["ours"] = {
            "forward_ms": _time(lambda: torch.ops.neox.swiglu_fc1(x, w_gate, w_up, tuned), warmup, iters, device),
            "dgrad_ms": _time(lambda: torch.ops.neox.dswiglu_fc2_dgrad(dy, w2, p_fused, tuned), warmup, iters,
                              device),
            "fc1_grads_ms": _time(lambda: torch.ops.neox.swiglu_fc1_grads(dp_fused, x, w_gate, w_up, tuned), warmup,
                                  iters, device)}
        unfused["fc1_grads_ms"] = _time(fc1_grads_unfused, warmup, iters, device)
    report["gemm_alone"] = {
        "cublas_forward_ms": _time(lambda: x @ b_fc1, warmup, iters, device),
        "quack_forward_ms": _time(lambda: quack.gemm(x, b_fc1, tuned=tuned), warmup, iters, device),
        "cublas_dgrad_ms": _time(lambda: dy @ w2, warmup, iters, device),
        "quack_dgrad_ms": _time(lambda: quack.gemm(dy, w2, tuned=tuned), warmup, iters, device),
    }
    return report


def host_us(fn, calls: int, device) -> float:
    """Host microseconds per call of `fn()`, issued back to back without waiting for the GPU: at a small token
    count its kernels finish faster than Python issues them, so this is the launch path's own cost (the part
    that makes a step host-bound), not the kernels'."""
    import time

    import torch

    for _ in range(10):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def host_report(shape: dict, tokens: int, calls: int, device, quack=None, tuned: bool = False) -> dict:
    """Host us per call (`host_us`) of each forward and dgrad call a layer makes, at `tokens` tokens: cuBLAS
    (`addmm` / `matmul`, what the torch layer issues for its GEMMs; its activation is inside the compiled
    layer's own kernels), quack's `gemm_act` / `gemm_dact` called directly and through our custom ops."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h, f, gated = shape["hidden"], shape["width"], shape["gated"]
    x, dy = torch.randn(tokens, h, dtype=dtype, device=device), torch.randn(tokens, h, dtype=dtype, device=device)
    w1 = torch.randn((2 if gated else 1) * f, h, dtype=dtype, device=device) * h ** -0.5
    w2 = torch.randn(h, f, dtype=dtype, device=device) * f ** -0.5
    b1 = torch.randn(f, dtype=dtype, device=device) if shape["bias"] and not gated else None
    report = {"tokens": tokens, "cublas_fc1_us": host_us(
        lambda: torch.addmm(b1, x, w1.t()) if b1 is not None else x @ w1.t(), calls, device),
        "cublas_dgrad_us": host_us(lambda: dy @ w2, calls, device)}
    if quack is None or gated:
        return report
    from megatron.model.fused_mlp import QUACK_GELU

    activation = shape["activation"]
    approximate = {v: k for k, v in QUACK_GELU.items()}[activation]
    p = x @ w1.t()
    report.update({
        "quack_gemm_act_us": host_us(lambda: quack.gemm_act(x, w1.t(), bias=b1, activation=activation, tuned=tuned),
                                     calls, device),
        "quack_gemm_dact_us": host_us(lambda: quack.gemm_dact(dy, w2, p, activation=activation, tuned=tuned),
                                      calls, device),
        "ours_fc1_us": host_us(lambda: torch.ops.neox.gelu_fc1(x, w1, b1, approximate, tuned), calls, device),
        "ours_dgrad_us": host_us(lambda: torch.ops.neox.dgelu_fc2_dgrad(dy, w2, p, approximate, b1 is not None, tuned),
                                 calls, device)})
    return report


def host_line(host: dict) -> str:
    """One printed line of a `host_report`."""
    return (f"host us per call at {host['tokens']} tokens: "
            + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in host.items() if k.endswith("_us")))


def main(argv=None) -> int:
    parser = kernel_bench_parser(__doc__.split("\n")[0], "410M")
    parser.add_argument("--fused", action="store_true", help="fail unless the fused (quack) side can run")
    parser.add_argument("--tuned", action="store_true", help="let quack autotune each shape (slow first call)")
    parser.add_argument("--host-tokens", type=int, default=0,
                        help="also time each call's host cost (us, back to back) at this many tokens (e.g. 256)")
    parser.add_argument("--host-only", action="store_true", help="with --host-tokens: only the host costs")
    opts = parser.parse_args(argv)
    import torch

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if opts.fused and device.type != "cuda":
        raise SystemExit("--fused: quack's kernels run on CUDA only (this run's device is the CPU)")
    quack = import_quack(opts.fused) if device.type == "cuda" else None
    reports = {}
    for size in [s for s in opts.sizes.split(",") if s]:
        shape = mlp_shape(bench_args(size, opts.seq, opts.micro_batch, device.type))
        if opts.host_only and opts.host_tokens:
            reports[size] = {**shape, "host": host_report(shape, opts.host_tokens, opts.iters * 20, device, quack,
                                                          opts.tuned)}
            print(f"{size}: " + host_line(reports[size]["host"]))
            continue
        report = {**shape, **layer_report(shape, opts.seq * opts.micro_batch, opts.warmup, opts.iters, device, quack,
                                          opts.tuned)}
        reports[size] = report
        kind = shape["activation"]
        print(f"\n== {size}: {report['tokens']} tokens, h {shape['hidden']}, f {shape['width']}, {kind}, "
              f"{shape['layers']} layers, {device} ==")
        u = report["unfused"]
        print(f"unfused: fc1 forward {u['forward_gemm_ms']:.3f} + act {u['forward_act_ms']:.3f} ms; "
              f"fc2 dgrad {u['dgrad_gemm_ms']:.3f} + act' {u['dgrad_act_ms']:.3f} ms (per layer)")
        if "fused" in report:
            fz, g = report["fused"], report["gemm_alone"]
            saved = shape["layers"] * (u["forward_ms"] + u["dgrad_ms"] - fz["forward_ms"] - fz["dgrad_ms"])
            print(f"fused:   fc1 forward {fz['forward_ms']:.3f} ms, fc2 dgrad {fz['dgrad_ms']:.3f} ms (per layer); "
                  f"{saved:+.2f} ms per step saved; relative errors {report['fused_relative_error']}")
            if "ours" in report:
                o = report["ours"]
                saved = shape["layers"] * (u["forward_ms"] + u["dgrad_ms"] - o["forward_ms"] - o["dgrad_ms"]
                                           + u.get("fc1_grads_ms", 0.0) - o.get("fc1_grads_ms", 0.0))
                grads = (f", fc1 dX + dW {o['fc1_grads_ms']:.3f} ms (cuBLAS {u['fc1_grads_ms']:.3f})"
                         if "fc1_grads_ms" in o else "")
                print(f"ours (mlp_impl quack): fc1 forward {o['forward_ms']:.3f} ms, fc2 dgrad {o['dgrad_ms']:.3f} ms"
                      f"{grads}; {saved:+.2f} ms per step saved")
            print(f"GEMMs alone, cuBLAS vs quack: forward {g['cublas_forward_ms']:.3f} vs {g['quack_forward_ms']:.3f}, "
                  f"dgrad {g['cublas_dgrad_ms']:.3f} vs {g['quack_dgrad_ms']:.3f} ms")
        if opts.host_tokens:
            report["host"] = host_report(shape, opts.host_tokens, opts.iters * 20, device, quack, opts.tuned)
            print(host_line(report["host"]))
    write_reports(opts, device, reports)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
