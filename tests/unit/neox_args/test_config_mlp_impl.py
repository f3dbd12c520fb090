"""`mlp_impl: quack` where the fused GELU MLP cannot run is one ConfigError at launch naming the keys, the
file and the fix; where it can, the config validates (the package is checked when the model is built:
tests/unit/model/test_fused_mlp.py)."""

import pytest

from megatron.neox_args import ConfigError, NeoXArgs

from conftest import MINIMAL

QUACK = {"mlp_impl": "quack", "activation": "gelu", "bf16": {"enabled": True}}


@pytest.mark.parametrize("overrides, phrases", [
    ({"activation": "relu"}, ["fuses the GELU and SwiGLU MLPs", "'relu'", "mlp_impl: torch"]),
    ({"activation": "swiglu", "intermediate_size": 1536, "use_bias_in_mlp": True},
     ["SwiGLU MLP without biases", "use_bias_in_mlp: false"]),
    ({"bf16": {"enabled": False}}, ["runs in bf16", "fp32", "bf16: {enabled: true}"]),
    ({"model_parallel_size": 2, "sequence_parallel": True},
     ["does not take sequence_parallel", "sequence_parallel: false"]),
    ({"mlp_impl": "torch", "mlp_autotune": True}, ["mlp_autotune: true tunes quack's kernels", "mlp_impl: quack"]),
    ({"zero_optimization": {"stage": 3}}, ["ZeRO stage 3", "zero_optimization.stage <= 2"]),
])
def test_quack_mlp_where_it_cannot_run_is_a_config_error(overrides, phrases):
    with pytest.raises(ConfigError) as info:
        NeoXArgs.from_dict({**MINIMAL, **QUACK, **overrides}, source="run.yml", world_size=2)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, message
    assert "run.yml" in message


def test_quack_mlp_and_the_default_validate():
    assert NeoXArgs.from_dict({**MINIMAL, **QUACK}, source="run.yml").model.mlp_impl == "quack"
    swiglu = {**QUACK, "activation": "swiglu", "intermediate_size": 1536, "use_bias_in_mlp": False}
    assert NeoXArgs.from_dict({**MINIMAL, **swiglu}, source="run.yml").model.activation == "swiglu"
    assert NeoXArgs.from_dict(dict(MINIMAL), source="run.yml").model.mlp_impl is None
    assert NeoXArgs.from_dict({**MINIMAL, **QUACK, "mlp_autotune": True}, source="run.yml").model.mlp_autotune
    assert NeoXArgs.from_dict({**MINIMAL, "mlp_autotune": True}, source="run.yml").model.mlp_autotune  # unset impl
    with pytest.raises(ConfigError, match="mlp_impl"):
        NeoXArgs.from_dict({**MINIMAL, "mlp_impl": "cutlass"}, source="run.yml")
