"""Tiny model configs shared by the model unit tests (imported by name: pytest puts this folder on sys.path)."""

from megatron.neox_args.sections import DerivedArgs, ModelArgs

VOCAB = 128


def make_args(**overrides):
    """A tiny ModelArgs and the DerivedArgs the model needs (resolved as the config loader would)."""
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, intermediate_size=64,
                  pos_emb="rotary")
    fields.update(overrides)
    model = ModelArgs(**fields)
    derived = DerivedArgs(
        num_kv_heads=model.num_kv_heads or model.num_attention_heads,
        intermediate_size=model.intermediate_size,
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
    )
    return model, derived


