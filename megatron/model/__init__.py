"""The decoder model (GPT-NeoX / Llama families) built from megatron.mpu layers."""

from megatron.model.gpt import GPTModel

__all__ = ["GPTModel"]
