"""Datasets (registry), the server's held-out test split, and client partitions, tokenised once."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

from fedpeft.config import ConfigError, DataConfig
from fedpeft.data import chatterbot, rotten_tomatoes, synthetic
from fedpeft.data.base import FederatedData, TextDataset, TokenizedData
from fedpeft.data.partition import partition
from fedpeft.models import Tokenizer
from fedpeft.registry import Registry

__all__ = [
    "DATASETS",
    "INSTRUCTION_DATASETS",
    "FederatedData",
    "TextDataset",
    "TokenizedData",
    "is_instruction",
    "load_file",
    "load_raw",
    "prepare",
    "tokenize",
]

DATASETS: Registry[Callable[[], TextDataset]] = Registry("dataset")
DATASETS.register("rotten-tomatoes")(rotten_tomatoes.load)
DATASETS.register("synthetic")(synthetic.load)
DATASETS.register("chatterbot")(chatterbot.load)
DATASETS.register("synthetic-qa")(synthetic.load_qa)
INSTRUCTION_DATASETS = ("chatterbot", "synthetic-qa")  # (prompt, answer) pairs, for causal LMs


def tokenize(raw: TextDataset, tokenizer: Tokenizer, max_length: int) -> TokenizedData:
    """Texts and labels; or, for instruction data, chat-formatted prompts + answers and targets."""
    import torch  # here, not at the top: the registry alone (`fedpeft list`) needs no torch

    if raw.answers is not None:
        if not hasattr(tokenizer, "encode_pairs"):
            raise ConfigError("this dataset is instruction data (prompts and answers): it needs a causal-LM model")
        return TokenizedData(*tokenizer.encode_pairs(raw.texts, raw.answers, max_length))
    if not hasattr(tokenizer, "encode_batch"):
        raise ConfigError("a causal-LM model trains on instruction data (prompts and answers): use such a dataset")
    if raw.pairs is not None:
        input_ids, attention_mask = tokenizer.encode_batch(raw.texts, max_length, pairs=raw.pairs)
    else:
        input_ids, attention_mask = tokenizer.encode_batch(raw.texts, max_length)
    return TokenizedData(input_ids, attention_mask, torch.tensor(raw.labels, dtype=torch.long))


# a node's data file is read before anything checks it: limits keep a hostile or broken file to one line
# of error (a 40 MB line cost 53 s and 7 GB to tokenise; the model reads max_length tokens of a text)
MAX_LINE_CHARS = 1_000_000  # a JSON line
MAX_TEXT_CHARS = 100_000  # a text (CSV fields stop at the csv module's 131,072)
_INDEX = re.compile(r"-?[0-9]{1,9}")  # a label given as its index: ASCII digits, never "²" or 5,000 digits


def _rows(path: Path) -> list[tuple[int, object]]:
    """(line number, row) of a JSON-lines or CSV file; ConfigError naming file and line otherwise."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {exc.start})") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        try:
            for row in reader:
                rows.append((reader.line_num, row))
        except csv.Error as exc:  # a field over the csv module's limit: raised before line_num counts its line
            raise ConfigError(f"{path}:{reader.line_num + 1}: not CSV ({exc})") from None
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_CHARS:
            raise ConfigError(f"{path}:{number}: a line of {len(line):,} characters (at most {MAX_LINE_CHARS:,})")
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not JSON ({exc.msg})") from None
        except RecursionError:
            raise ConfigError(f"{path}:{number}: JSON nested too deep") from None
        except ValueError as exc:  # an integer of over 4,300 digits
            raise ConfigError(f"{path}:{number}: not usable JSON ({str(exc)[:80]})") from None
    return rows


def load_file(path: str | Path, label_names: tuple[str, ...]) -> TextDataset:
    """A node's own examples from a file: JSON lines ({"text": ..., "label": ...}) or CSV with a
    header naming `text` and `label` columns. A label is one of `label_names` or its index. Errors
    name the file and line, never the line's values (a node's error may reach the server)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist")
    texts, labels = [], []
    for number, row in _rows(path):
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected an object with text and label, got a JSON {type(row).__name__}")
        if "text" not in row or "label" not in row:
            raise ConfigError(f"{where}: needs 'text' and 'label' (got {sorted(map(str, row))})")
        if not isinstance(row["text"], str):
            raise ConfigError(f"{where}: text must be a string (got {type(row['text']).__name__})")
        if len(row["text"]) > MAX_TEXT_CHARS:
            raise ConfigError(f"{where}: a text of {len(row['text']):,} characters (at most {MAX_TEXT_CHARS:,})")
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise ConfigError(f"{where}: label must be a name or an index (got {type(label).__name__})")
        if str(label) in label_names:
            labels.append(label_names.index(str(label)))
        elif _INDEX.fullmatch(str(label)) and 0 <= int(label) < len(label_names):
            labels.append(int(label))
        else:
            # the message may reach the server: it names the line, never the line's values
            raise ConfigError(f"{where}: its label is none of {list(label_names)} (or 0..{len(label_names) - 1})")
        texts.append(row["text"])
    if not texts:
        raise ConfigError(f"{path}: no examples")
    return TextDataset(texts, labels, [path.stem] * len(texts), label_names)


def load_raw(cfg: DataConfig) -> TextDataset:
    """data.name's examples: a registered dataset, or a file, saved directory or Hugging Face id
    (fedpeft.data.files, with data.columns)."""
    from fedpeft.data.files import is_external, load_external

    return load_external(cfg.name, cfg.columns) if is_external(cfg.name) else DATASETS.get(cfg.name)()


def is_instruction(cfg: DataConfig) -> bool:
    """data.name is (prompt, answer) data, for a causal LM."""
    from fedpeft.data.files import is_external

    return load_raw(cfg).answers is not None if is_external(cfg.name) else cfg.name in INSTRUCTION_DATASETS


def _by_unit(raw: TextDataset, test_size: int, public_size: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Held-out rows by whole units: units in seeded random order to the test split until it holds
    `test_size` rows, then to the public split, the rest to the pool. With `raw.novel_answers`, a
    test row whose answer is verbatim a prompt or answer of the pool is dropped (from both)."""
    import torch

    by_unit: dict[str, list[int]] = {}
    for row, unit in enumerate(raw.units):
        by_unit.setdefault(unit, []).append(row)
    names = sorted(by_unit)
    test, public, pool = [], [], []
    for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist():
        rows = by_unit[names[i]]
        (test if len(test) < test_size else public if len(public) < public_size else pool).extend(rows)
    if raw.novel_answers and raw.answers is not None:
        seen = {raw.texts[i] for i in pool} | {raw.answers[i] for i in pool}
        test = [i for i in test if raw.answers[i] not in seen]
    return test, public, sorted(pool)


def prepare(
    cfg: DataConfig,
    num_clients: int,
    tokenizer: Tokenizer,
    max_length: int,
    seed: int,
    raw: TextDataset | None = None,
) -> FederatedData:
    """Hold out the server's test split, partition the rest, tokenise everything once.

    `raw` is the loaded dataset `cfg.name`; it is loaded here when not given."""
    import torch

    raw = raw if raw is not None else load_raw(cfg)
    n = len(raw.texts)
    own = raw.test_rows or ()  # the dataset's own test split: at most test_size of it, the rest trains
    held = (0 if own else cfg.test_size) + cfg.public_size
    if held >= n - len(own):
        raise ValueError(f"data.test_size + data.public_size = {held} leaves no training data ({n} examples)")
    generator, skip = torch.Generator().manual_seed(seed), set(own)
    order = [i for i in torch.randperm(n, generator=generator).tolist() if i not in skip]
    test_rows, public_rows, pool = order[: cfg.test_size], order[cfg.test_size : held], sorted(order[held:])
    if own:
        pick = torch.randperm(len(own), generator=torch.Generator().manual_seed(seed))[: cfg.test_size]
        test_rows, public_rows, pool = sorted(own[i] for i in pick.tolist()), order[:held], sorted(order[held:])
    elif raw.units is not None:  # whole units (conversations) to the server, never split with a client
        test_rows, public_rows, pool = _by_unit(raw, cfg.test_size, cfg.public_size, seed)
    if cfg.max_examples:
        keep = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 1))[: cfg.max_examples]
        pool = sorted(pool[i] for i in keep.tolist())

    everything = tokenize(raw, tokenizer, max_length)
    parts = partition(
        [raw.labels[i] for i in pool],
        [raw.groups[i] for i in pool],
        num_clients,
        cfg.partition,
        cfg.dirichlet_alpha,
        seed,
    )
    pool_t = torch.tensor(pool, dtype=torch.long)
    ids = [pool_t[torch.tensor(rows, dtype=torch.long)] for rows in parts]
    clients = [everything.select(i) for i in ids]
    public = everything.select(torch.tensor(public_rows, dtype=torch.long)) if public_rows else None
    pairs = tuple((raw.texts[i], raw.answers[i]) for i in test_rows) if raw.answers is not None else ()
    rows = tuple(tuple(i.tolist()) for i in ids)
    return FederatedData(clients, everything.select(torch.tensor(test_rows)), raw.label_names, public, pairs, rows)
