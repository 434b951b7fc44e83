"""The classifier around an encoder: mask-aware mean pooling and a linear head, and a head
initialised from public information (the label names)."""

from __future__ import annotations

import torch
from torch import nn

from fedpeft.models import Tokenizer

__all__ = ["MeanPoolClassifier", "label_name_rows"]


class MeanPoolClassifier(nn.Module):
    """Encoder -> mean of the last hidden states over real tokens -> linear head."""

    def __init__(self, backbone: nn.Module, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, num_labels)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled representation the head reads: mean of the last hidden states over real tokens."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))


@torch.no_grad()
def label_name_rows(model: MeanPoolClassifier, tokenizer: Tokenizer, label_names: tuple[str, ...]) -> torch.Tensor:
    """A head's weight from public information only: row c is the encoder's mean-pooled embedding
    of label name c, centred over the labels and scaled to unit norm (the bias is then zero). With
    the head frozen, every change in accuracy comes from the adapters."""
    if len(label_names) != model.head.out_features:
        raise ValueError(f"{len(label_names)} label names for a head of {model.head.out_features} outputs")
    ids, mask = tokenizer.encode_batch([name.replace("_", " ").replace("-", " ") for name in label_names], 16)
    pooled = model.features(ids, mask)
    rows = pooled - pooled.mean(0, keepdim=True)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
