"""`torch_compile_mode: reduce-overhead` on the GPU: each compiled layer replayed as CUDA graphs (torch's
CUDA-graph trees) trains like the default compiled layers (run on the GPU machine: `python -m pytest -m gpu
tests/gpu -q`; deselected elsewhere).

Both models run the same inductor kernels; the graphs change who launches them, not the arithmetic. So the
losses and gradients of several steps (weights updated in place between them, as the optimizer does) must
agree to rounding: relative 1e-3 (bf16 results, kernels chosen per run by cuBLAS heuristics).
"""

import pytest
import torch

from megatron import mpu
from megatron.model import GPTModel
from megatron.neox_args.sections import DerivedArgs, ModelArgs

pytestmark = pytest.mark.gpu

VOCAB = 512
STEPS = 4


def _args():
    model = ModelArgs(num_layers=3, hidden_size=256, num_attention_heads=4, seq_length=256, rotary_pct=0.25,
                      no_weight_tying=True, pos_emb="rotary")
    derived = DerivedArgs(num_kv_heads=4, intermediate_size=1024, max_position_embeddings=256, vocab_size=VOCAB,
                          padded_vocab_size=VOCAB)
    return model, derived


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu needs a CUDA device (run them with -m gpu on the GPU machine)")


def _train(model, batches, cudagraphs: bool):
    """STEPS steps of plain SGD (in place, as DeepSpeed's optimizers write the weights); per step the loss and a
    copy of every gradient, taken before the next replay may reuse the graph's memory."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for tokens, labels in batches:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = model(tokens, labels, None)
        loss.backward()
        history.append((loss.detach().float().clone(),
                        {name: p.grad.float().clone() for name, p in model.named_parameters()}))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return history


def test_reduce_overhead_layers_train_like_default_compiled_layers():
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    counters.clear()
    model_args, derived = _args()
    torch.manual_seed(0)
    default = GPTModel(model_args, derived, mpu.ParallelState.single(), precision="bf16", torch_compile=True).cuda()
    graphed = GPTModel(model_args, derived, mpu.ParallelState.single(), precision="bf16", torch_compile=True,
                       compile_mode="reduce-overhead").cuda()
    graphed.load_state_dict(default.state_dict())
    generator = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randint(0, VOCAB, (2, 256), device="cuda", generator=generator),
                torch.randint(0, VOCAB, (2, 256), device="cuda", generator=generator)) for _ in range(STEPS)]

    expected = _train(default, batches, cudagraphs=False)
    got = _train(graphed, batches, cudagraphs=True)

    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and len(list(manager.get_roots())) > 0, "no CUDA graph was recorded"
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(got, expected)):
        assert abs(loss.item() - ref_loss.item()) <= 1e-3 * abs(ref_loss.item()), (step, loss, ref_loss)
        for name, grad in ref_grads.items():
            assert _rel(grads[name], grad) < 1e-3, (step, name, _rel(grads[name], grad))
    for name, weight in default.state_dict().items():  # the in-place updates reached the graphs' weights
        assert _rel(graphed.state_dict()[name], weight) < 1e-3, name
