"""Causal-LM instruction tuning: chat-formatted (prompt, answer) pairs, the answer-only loss, its
evaluation and greedy generation.

An example is the model's chat template applied to the prompt (with the generation prompt), then
the answer and the end-of-turn token, truncated on the right at `model.max_length`. Targets are
stored shifted: `targets[i, t]` is the token the model should predict at position t, which is the
next input token when that token belongs to the answer and IGNORE otherwise (the prompt, the
template, the padding). An example's loss is the mean cross-entropy over its answer tokens, so one
example is one unit under DP-SGD whatever its length; a batch's is the mean (or sum) of those.
Evaluation weighs every answer token alike (perplexity, token accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE", "ByteChatTokenizer", "ChatTokenizer", "answer_window", "encode_pairs", "evaluate_lm", "greedy",
    "lm_summary", "perplexity", "token_loss", "write_generations",
]  # fmt: skip

IGNORE = -100
LOGIT_BUDGET = 2**25  # logits (floats) one evaluation batch may hold: 128 MiB


def encode_pairs(
    prompt_rows: Sequence[list[int]], answer_rows: Sequence[list[int]], max_length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, targets), [N, max_length] each, right-padded, from token rows."""
    n = len(prompt_rows)
    ids = torch.full((n, max_length), pad_id, dtype=torch.long)
    mask = torch.zeros(n, max_length, dtype=torch.long)
    targets = torch.full((n, max_length), IGNORE, dtype=torch.long)
    for i, (prompt, answer) in enumerate(zip(prompt_rows, answer_rows, strict=True)):
        row = (list(prompt) + list(answer))[:max_length]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
        # position t predicts row[t + 1]; only answer tokens (index >= len(prompt)) are targets
        for t in range(max(len(prompt) - 1, 0), len(row) - 1):
            targets[i, t] = row[t + 1]
    return ids, mask, targets


class _ChatRows:
    """What every causal-LM tokenizer derives from its `prompt_ids`, `answer_ids` and `pad_token_id`."""

    def encode_pairs(self, prompts: Sequence[str], answers: Sequence[str], max_length: int):  # noqa: ANN201
        return encode_pairs([self.prompt_ids(p) for p in prompts], [self.answer_ids(a) for a in answers],
                            max_length, self.pad_token_id)  # fmt: skip


class ChatTokenizer(_ChatRows):
    """A Hugging Face tokenizer with a chat template, as fedpeft's causal-LM tokenizer."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - any PreTrainedTokenizerBase with a chat template
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template")
        self._tok = tokenizer
        self.end_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id

    def prompt_ids(self, prompt: str) -> list[int]:
        """The template around one user turn, up to and including the assistant's opening."""
        out = self._tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)

    def answer_ids(self, answer: str) -> list[int]:
        return list(self._tok(answer, add_special_tokens=False)["input_ids"]) + [self.end_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __call__(self, text: str | list[str], **kwargs: Any) -> Mapping[str, Any]:
        return self._tok(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._tok, name)


class ByteChatTokenizer(_ChatRows):
    """Dependency-free chat tokenizer for tiny test models: UTF-8 bytes, and a two-turn template.

    Ids: 0 = pad, 1 = <user>, 2 = <assistant>, 3 = <end>, 4 + b = byte b (vocab 260). Invertible,
    so a tiny model's generations decode."""

    vocab_size = 260
    pad_token_id = 0
    end_id = 3

    def prompt_ids(self, prompt: str) -> list[int]:
        return [1, *(4 + b for b in prompt.encode()), 2]

    def answer_ids(self, answer: str) -> list[int]:
        return [*(4 + b for b in answer.encode()), self.end_id]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 4 for i in ids if 4 <= i < 260).decode("utf-8", errors="replace")

    def __call__(self, text: str | list[str], **kwargs: Any) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        rows = [[4 + b for b in t.encode()] for t in texts]
        return {"input_ids": rows[0] if isinstance(text, str) else rows}


def answer_window(targets: torch.Tensor) -> tuple[dict[str, int], torch.Tensor]:
    """Forward arguments that compute logits only from the batch's first answer column on
    (`logits_to_keep`: the prompts' and template's positions need none), and the targets of those
    columns. Exact: the other columns have no targets."""
    width = targets.shape[1]
    columns = torch.nonzero((targets != IGNORE).any(0)).flatten()
    start = min(int(columns[0]) if len(columns) else width - 1, width - 1)
    return {"logits_to_keep": width - start}, targets[:, start:]


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Each example's mean cross-entropy over its answer tokens; then their mean or sum (an example
    whose answer was cut off entirely contributes 0)."""
    n, width, vocab = logits.shape
    nll = F.cross_entropy(logits.reshape(n * width, vocab), targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    count = (targets != IGNORE).sum(1).clamp_min(1)
    per_example = nll.view(n, width).sum(1) / count
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    raise ValueError(f"reduction must be mean or sum (got {reduction!r})")


@torch.inference_mode()
def evaluate_lm(forward, data, batch_size: int, vocab_size: int) -> dict[str, float]:  # noqa: ANN001
    """Answer-token loss (mean NLL per answer token) and token accuracy (greedy next token = the
    answer's), over `data` (TokenizedData with targets). `forward(ids, mask)` gives logits.
    Batches group similar lengths and hold at most LOGIT_BUDGET logits."""
    lengths = data.attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    nll_sum, correct, tokens, start = 0.0, 0, 0, 0
    while start < len(order):
        width = int(lengths[order[min(start + batch_size, len(order)) - 1]])
        rows = max(1, min(batch_size, LOGIT_BUDGET // max(width * vocab_size, 1)))
        ids, mask, targets = data.batch(order[start : start + rows])
        start += rows
        window, targets = answer_window(targets)
        logits = forward(ids, mask, **window).float().cpu()
        keep = targets != IGNORE
        nll_sum += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        correct += int((logits[keep].argmax(-1) == targets[keep]).sum())
        tokens += int(keep.sum())
    return {"accuracy": correct / max(tokens, 1), "loss": nll_sum / max(tokens, 1)}


def perplexity(loss: float) -> float:
    """exp of the mean answer-token loss (capped at exp(50))."""
    return math.exp(min(loss, 50.0))


def lm_summary(base: dict[str, float], loss: float, generations: list[dict[str, str]]) -> dict[str, Any]:
    """What a causal LM's run summary adds: the base model's scores, perplexities, generations."""
    return {
        **{f"base_{k}": v for k, v in base.items()}, "base_perplexity": perplexity(base["loss"]),
        "perplexity": perplexity(loss), "generations": generations,
    }  # fmt: skip


@torch.inference_mode()
def greedy(lm, tokenizer, prompts: Sequence[str], max_new_tokens: int, device: torch.device) -> list[str]:  # noqa: ANN001
    """Greedy answers of `lm` (a Hugging Face causal LM, adapters active) to each prompt, one at a
    time (no padding), stopping at the end-of-turn token."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.prompt_ids(prompt)], device=device)
        generated = lm.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tokenizer.end_id, pad_token_id=tokenizer.pad_token_id, use_cache=True,
        )  # fmt: skip
        new = generated[0, ids.shape[1] :].tolist()
        out.append(tokenizer.decode(new[: new.index(tokenizer.end_id)] if tokenizer.end_id in new else new).strip())
    return out


SHOWN_PROMPTS = 4  # test prompts whose greedy answers a run writes and prints
MAX_NEW_TOKENS = 48
GENERATIONS = "generations.jsonl"


def write_generations(model, base, final, pairs: Sequence[tuple[str, str]], out) -> list[dict[str, str]]:  # noqa: ANN001
    """Greedy answers of the base model (`base`, adapters at their start) and of the federated one
    (`final`) to the server's first test prompts, beside the reference answers; written to
    out/GENERATIONS (JSON lines) and returned. `model` is the run's AdaptedModel."""
    import json
    from pathlib import Path

    shown = pairs[:SHOWN_PROMPTS]
    prompts = [p for p, _ in shown]
    answers = {}
    for which, state in (("base", base), ("federated", final)):
        model.load(state)
        model.module.eval()
        answers[which] = greedy(model.classifier, model.tokenizer, prompts, MAX_NEW_TOKENS, model.device)
    rows = [
        {"prompt": p, "reference": r, "base": b, "federated": f}
        for (p, r), b, f in zip(shown, answers["base"], answers["federated"], strict=True)
    ]
    Path(out, GENERATIONS).write_text("".join(json.dumps(row) + "\n" for row in rows))
    model.load(final)
    return rows
