"""GPU numerics (run on the GPU machine: `python -m pytest -m gpu tests/gpu -q`; deselected elsewhere).

bf16 tolerances follow the usual bands: relative error of bf16 results against an fp32 reference between
1e-3 and 1e-2; compiled vs eager bf16 differ by rounding order only.
"""

import pytest
import torch

from megatron import mpu
from megatron.model import GPTModel
from megatron.model.attention import sdpa_causal_attention
from megatron.mpu.fused_cross_entropy import fused_linear_cross_entropy
from megatron.neox_args.sections import DerivedArgs, ModelArgs

pytestmark = pytest.mark.gpu

VOCAB = 512


def _args(**overrides):
    fields = dict(num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=256, rotary_pct=0.25,
                  gpt_j_residual=True, no_weight_tying=True)
    fields.update(overrides)
    model = ModelArgs(**fields)
    derived = DerivedArgs(num_kv_heads=model.num_kv_heads or model.num_attention_heads,
                          intermediate_size=4 * model.hidden_size, max_position_embeddings=model.seq_length,
                          vocab_size=VOCAB, padded_vocab_size=VOCAB)
    return model, derived


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu needs a CUDA device (run them with -m gpu on the GPU machine)")
    torch.manual_seed(0)


def _loss_and_grads(model, tokens, labels):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, labels, None)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def test_bf16_model_tracks_fp32_and_compiled_tracks_eager():
    model_args, derived = _args()
    torch.manual_seed(1)
    reference = GPTModel(model_args, derived, mpu.ParallelState.single()).cuda()
    bf16 = GPTModel(model_args, derived, mpu.ParallelState.single(), precision="bf16").cuda()
    bf16.load_state_dict({k: v.bfloat16() for k, v in reference.state_dict().items()})
    compiled = GPTModel(model_args, derived, mpu.ParallelState.single(), precision="bf16",
                        torch_compile=True).cuda()
    compiled.load_state_dict(bf16.state_dict())
    tokens = torch.randint(0, VOCAB, (4, model_args.seq_length), device="cuda")
    labels = torch.randint(0, VOCAB, (4, model_args.seq_length), device="cuda")

    ref_loss, ref_grads = _loss_and_grads(reference, tokens, labels)
    loss, grads = _loss_and_grads(bf16, tokens, labels)
    c_loss, c_grads = _loss_and_grads(compiled, tokens, labels)
    assert abs(loss - ref_loss) / ref_loss < 1e-2
    assert abs(c_loss - loss) / loss < 5e-3
    for name, grad in ref_grads.items():
        assert _rel(grads[name], grad) < 5e-2, name
        assert _rel(c_grads[name], grads[name]) < 5e-2, name


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn", "math"])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_sdpa_backends_agree_with_fp32(backend, kv_heads):
    q = torch.randn(2, 8, 1024, 64, device="cuda")
    k = torch.randn(2, kv_heads, 1024, 64, device="cuda")
    v = torch.randn(2, kv_heads, 1024, 64, device="cuda")
    reference = sdpa_causal_attention(q, k, v, dropout_p=0.0, backend="math")
    out = sdpa_causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), dropout_p=0.0, backend=backend)
    assert _rel(out, reference) < 1e-2


def test_fused_cross_entropy_bf16_matches_fp32():
    n, h = 8192, 512
    hidden = torch.randn(n, h, device="cuda", requires_grad=True)
    weight = (0.02 * torch.randn(4 * VOCAB, h, device="cuda")).requires_grad_()
    target = torch.randint(0, 4 * VOCAB, (n,), device="cuda")
    token_weights = torch.full((n,), 1.0 / n, device="cuda")
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), target)
    reference.backward()
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16().requires_grad_()
    loss = fused_linear_cross_entropy(hb, wb, target, token_weights, None, 1024)
    loss.backward()
    assert abs(loss.item() - reference.item()) / reference.item() < 1e-2
    assert _rel(hb.grad, hidden.grad) < 2e-2 and _rel(wb.grad, weight.grad) < 2e-2


def test_fused_cross_entropy_excludes_padded_vocabulary_on_cuda():
    """The compiled chunk kernels with vocab_size < rows: bf16 loss and gradients over the padded weight
    equal the fp32 cross entropy over the real rows only (1e-2), the padding rows' gradient exactly 0."""
    n, h, real, padded = 4096, 256, 1000, 1024
    hidden = torch.randn(n, h, device="cuda", requires_grad=True)
    weight = (0.02 * torch.randn(padded, h, device="cuda")).requires_grad_()
    target = torch.randint(0, real, (n,), device="cuda")
    reference = torch.nn.functional.cross_entropy(hidden @ weight[:real].t(), target)
    reference.backward()
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16().requires_grad_()
    loss = fused_linear_cross_entropy(hb, wb, target, torch.full((n,), 1.0 / n, device="cuda"), None, 1024,
                                      vocab_size=real)
    loss.backward()
    assert abs(loss.item() - reference.item()) / reference.item() < 1e-2
    assert _rel(hb.grad, hidden.grad) < 2e-2 and _rel(wb.grad[:real], weight.grad[:real]) < 2e-2
    assert torch.count_nonzero(wb.grad[real:]) == 0


def test_fp32_output_gemm_accumulates_half_products_in_fp32():
    """accumulate_product_fp32 on bf16 inputs: cuBLAS with an fp32 output (available on the GPU machine's
    torch), equal to the fp32 product of the same bf16 values to fp32 GEMM rounding (rel 1e-5), and closer
    to it than the old bf16 product + add."""
    from megatron.mpu.fused_cross_entropy import _fp32_output_gemm_available, accumulate_product_fp32

    assert _fp32_output_gemm_available()
    a = torch.randn(4096, 2048, device="cuda").bfloat16()
    b = torch.randn(2048, 512, device="cuda").bfloat16()
    start = torch.randn(4096, 512, device="cuda")
    total = start.clone()
    accumulate_product_fp32(total, a, b)
    exact = start + a.double() @ b.double()
    old_way = start + (a @ b).float()
    assert _rel(total.double(), exact) < 1e-5
    assert _rel(total.double(), exact) < _rel(old_way.double(), exact) / 10


def test_compiled_rotary_reads_the_tables_and_computes_no_cos_or_sin():
    """The compiled layer's rotary kernel loads cos/sin from the kept tables (positional.RotaryEmbedding):
    no cos or sin is evaluated per q/k element (what made the 410M forward's rotary kernel compute-bound),
    and q, k, v match the eager layer's within bf16 rounding (inductor rounds once, eager after each op),
    with positions 0..s-1 and restarting per document."""
    import re

    from torch._inductor.utils import run_and_get_code

    model_args, derived = _args(pos_emb="rotary")
    layer = GPTModel(model_args, derived, mpu.ParallelState.single(), precision="bf16").cuda().layers[0]
    attention = layer.attention
    x = torch.randn(model_args.seq_length, 2, model_args.hidden_size, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(model_args.seq_length, device="cuda").remainder(100).expand(2, -1)
    torch._dynamo.reset()
    for position_ids in (None, positions):
        compiled = torch.compile(attention.qkv_heads)
        got, code = run_and_get_code(compiled, x, position_ids)
        source = "\n".join(code)
        assert not re.search(r"(::|\.)(cos|sin)f?\(", source), source[:4000]
        for g, e in zip(got, attention.qkv_heads(x, position_ids)):
            torch.testing.assert_close(g, e, atol=1e-2, rtol=1.6e-2)
