"""Labels for new texts from a finished run: its exported adapter on the rebuilt base model.

    from fedpeft import predict
    for p in predict("runs/quickstart-.../", ["a gripping, beautifully acted film"]):
        print(p.label, f"{p.probability:.2f}")

`fedpeft predict RUN_DIR "text" ...` prints the same. A causal LM's run answers prompts instead:

    from fedpeft import generate
    print(generate("runs/instruct-.../", ["What is a computer?"]))  # greedy, through the chat template
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpeft.adapters import EXPORT_META, default_label_names, load_exported
from fedpeft.causal import MAX_NEW_TOKENS, greedy

__all__ = ["Prediction", "Predictor", "generate", "predict"]


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str  # the most probable label's name
    probability: float  # its probability
    probabilities: dict[str, float]  # every label's, in the dataset's label order


class Predictor:
    """An exported run loaded once, for predicting many batches."""

    def __init__(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        meta = json.loads((run_dir / EXPORT_META).read_text())
        if meta.get("task") == "causal-lm":
            raise ValueError(f"{run_dir} is a causal LM's run: it answers prompts (fedpeft.generate), it has no labels")
        self.model, self.tokenizer = load_exported(run_dir)
        self.max_length = int(meta["max_length"])
        self.label_names = list(meta.get("label_names") or default_label_names(meta["num_labels"]))

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> list[Prediction]:
        if isinstance(texts, str):
            texts = [texts]
        out: list[Prediction] = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            for text, probs in zip(chunk, torch.softmax(logits.float(), dim=-1).tolist(), strict=True):
                best = max(range(len(probs)), key=probs.__getitem__)
                named = dict(zip(self.label_names, probs, strict=True))
                out.append(Prediction(text, self.label_names[best], probs[best], named))
        return out


def predict(run_dir: str | Path, texts: Sequence[str]) -> list[Prediction]:
    """The label and probabilities of each text under the run's final federated model."""
    return Predictor(run_dir)(texts)


def generate(run_dir: str | Path, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers of a causal LM's finished run (its exported adapter on the rebuilt base) to
    each prompt, through the model's chat template."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / EXPORT_META).read_text())
    if meta.get("task") != "causal-lm":
        raise ValueError(f"{run_dir} is a classifier's run: it labels texts (fedpeft.predict)")
    model, tokenizer = load_exported(run_dir)
    return greedy(model, tokenizer, [prompts] if isinstance(prompts, str) else list(prompts), max_new_tokens,
                  next(model.parameters()).device)  # fmt: skip
