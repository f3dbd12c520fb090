"""Document-aware fields of a micro-batch: loss mask, position ids and document boundaries.

A training sample is `seq_length` tokens cut from a stream of documents, each ended by the tokenizer's
end-of-document id (`eod`, appended by preprocessing), so one sample usually holds several documents.
The three GPT-NeoX/Megatron keys (all off by default, which gives plain causal attention over the sample):

- `eod_mask_loss`: no loss where the *input* token is the end-of-document token, i.e. the prediction of
  the next document's first token from the previous document's `eod` is not trained
  (`loss_mask[tokens == eod] = 0`).
- `reset_position_ids`: positions restart at 0 after every `eod` in the input: the `eod` belongs to the
  document it ends, the next token has position 0.
- `reset_attention_mask`: a token attends only to tokens of its own document (as just defined) at or
  before it: the attention is block-diagonal causal. It is delivered as document boundaries, never as an
  `s x s` mask: `cu_seqlens` int32 `[n_docs + 1]`, the cumulative lengths of the documents of the whole
  micro-batch flattened row by row (`b * s` tokens; a row boundary always ends a document), and
  `max_seqlen`, the longest document, as a Python int (variable-length kernels need it on the host).

Boundaries are built here, on the data-loader side, from the full sequence: under sequence parallelism
every tensor rank gets the same full-sequence `cu_seqlens` and `position_ids` (attention runs on the
gathered sequence; the embedding takes its own shard of `position_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class DocumentMasking:
    """What the collate step builds from the end-of-document id `eod` (see the module docstring)."""

    eod: Optional[int] = None
    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    eod_mask_loss: bool = False

    @property
    def active(self) -> bool:
        return self.reset_attention_mask or self.reset_position_ids or self.eod_mask_loss

    def __post_init__(self):
        if self.active and self.eod is None:
            raise ValueError("reset_attention_mask / reset_position_ids / eod_mask_loss need the tokenizer's "
                             "end-of-document id (eod)")


def document_starts(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """bool `[b, s]`: True where a document starts (column 0, and right after every `eod` input token)."""
    starts = torch.zeros(tokens.shape, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eod
    return starts


def position_ids_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """int64 `[b, s]`: distance of each token to the start of its document (0 at every start)."""
    b, s = starts.shape
    index = torch.arange(s, dtype=torch.int64).expand(b, s)
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # [b, s]
    return index - last_start


def cu_seqlens_from_starts(starts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(`cu_seqlens` int32 `[n_docs + 1]`, `max_seqlen`) of the documents of `starts` `[b, s]` flattened
    row-major to `b * s` tokens (every row start is a document start)."""
    b, s = starts.shape
    begin = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)  # [n_docs] flat start offsets
    cu = torch.cat([begin, torch.tensor([b * s])]).to(torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    return cu, max_seqlen


def document_fields(tokens: torch.Tensor, masking: DocumentMasking) -> dict:
    """The fields `masking` asks for, for input tokens `[b, s]`: `loss_mask` float32 `[b, s]` (always),
    `position_ids` int64 `[b, s]` (reset_position_ids), `cu_seqlens` and `max_seqlen`
    (reset_attention_mask)."""
    loss_mask = torch.ones(tokens.shape, dtype=torch.float32)
    out: dict = {"loss_mask": loss_mask}
    if not masking.active:
        return out
    if masking.eod_mask_loss:
        loss_mask[tokens == masking.eod] = 0.0
    starts = document_starts(tokens, masking.eod)
    if masking.reset_position_ids:
        out["position_ids"] = position_ids_from_starts(starts)
    if masking.reset_attention_mask:
        out["cu_seqlens"], out["max_seqlen"] = cu_seqlens_from_starts(starts)
    return out
