"""Datasets from outside the registry, read with Hugging Face `datasets`: a local file (.csv, .json,
.jsonl, .parquet), a directory written by `save_to_disk`, or a Hugging Face id (`nyu-mll/glue:sst2`:
the id, then its config after a colon).

Columns: `data.columns` maps roles to column names (`["text=sentence1", "text_pair=sentence2"]`);
a role left out takes the first column of its usual names that the data has. Roles: `text`, an
optional `text_pair` (sentence pairs, passed to the tokenizer as a pair), `label`, an optional
`group` (what the natural partition splits by), and for instruction data `prompt` and `answer`
(then the data is instruction data, for a causal LM). Splits: a dataset with splits trains on
`train` and the server scores on its own `validation` (or `validation_matched`, or a labelled
`test`), at most data.test_size rows of it; one table is held out by row, as the bundled data are.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError
from fedpeft.data.base import TextDataset

__all__ = ["is_external", "load_external"]

ROLES = ("text", "text_pair", "label", "group", "prompt", "answer")
USUAL = {  # the column names a role is looked up under when data.columns does not name it
    "text": ("text", "sentence", "sentence1", "premise", "question", "question1", "content"),
    "text_pair": ("text_pair", "sentence2", "hypothesis", "question2"),
    "label": ("label", "labels", "target"),
    "group": ("group", "domain", "topic", "user"),
    "prompt": ("prompt", "instruction", "input_text"),
    "answer": ("answer", "response", "output", "completion"),
}
FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TEST_SPLITS = ("validation", "validation_matched", "test")


def is_external(name: str) -> bool:
    """`name` is a local file or directory, or a Hugging Face id ORG/NAME[:CONFIG]; a registered
    name is not, and any other is an unknown dataset (answered at once: no network, no torch)."""
    from fedpeft.data import DATASETS
    from fedpeft.models import HUB_ID
    from fedpeft.registry import UnknownNameError

    if name in DATASETS:
        return False
    if not Path(name).expanduser().exists() and (name.startswith(("/", ".", "~")) or Path(name).suffix in FILE_FORMATS):
        raise ConfigError(f"data file {name!r} does not exist")
    if Path(name).expanduser().exists() or HUB_ID.fullmatch(name.partition(":")[0]):
        return True
    try:
        DATASETS.get(name)
    except UnknownNameError as exc:
        raise UnknownNameError(f"{exc}; or a local file or directory, or a Hugging Face id ORG/NAME[:CONFIG]") from None
    return False


def load_external(name: str, columns: tuple[str, ...] = ()) -> TextDataset:
    """The dataset `name` as fedpeft's TextDataset (its test split's rows in `test_rows`)."""
    return _load(_source(name), tuple(columns))


def _source(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


@functools.lru_cache(maxsize=8)
def _load(source: str, columns: tuple[str, ...]) -> TextDataset:
    splits = _read(source)
    train = splits.get("train") or next(iter(splits.values()))
    test_name = next((s for s in TEST_SPLITS if s in splits and s != "train"), None)
    roles = _roles(source, list(train.column_names), columns)
    tables = [train] + ([splits[test_name]] if test_name else [])
    rows = [{role: table[col] for role, col in roles.items()} for table in tables]
    if "prompt" in roles:
        return _instruction(source, rows)
    names = _label_names(train.features.get(roles["label"]), [v for part in rows for v in part["label"]])
    labels, texts, pairs, groups, test = [], [], [], [], []
    for part, table in enumerate(rows):
        for i, value in enumerate(table["label"]):
            if value is None or (isinstance(value, int) and value < 0):  # unlabelled (GLUE's test split)
                continue
            if part:
                test.append(len(texts))
            labels.append(names.index(str(value)) if str(value) in names else int(value))
            texts.append(_text(table["text"][i], source, "text"))
            if "text_pair" in table:
                pairs.append(_text(table["text_pair"][i], source, "text_pair"))
            groups.append(str(table["group"][i]) if "group" in table else Path(source).stem)
    if not texts:
        raise ConfigError(f"dataset {source!r} has no labelled rows")
    if test_name and not test:
        raise ConfigError(f"dataset {source!r}: its {test_name} split has no labelled rows to score on")
    return TextDataset(texts, labels, groups, names, pairs=pairs or None, test_rows=tuple(test) if test_name else None)


def _read(source: str) -> dict[str, Any]:
    """{split name: a datasets.Dataset}; ConfigError saying what was tried."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    hub_logging.set_verbosity_error()
    path = Path(source)
    try:
        if path.is_file():
            if path.suffix not in FILE_FORMATS:
                raise ConfigError(
                    f"data file {source!r}: the format is read from its suffix, one of {', '.join(FILE_FORMATS)}"
                )
            loaded = datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path))
        elif path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        else:
            print(
                f"fedpeft: reading dataset {source} from the Hugging Face hub (or its cache)",
                file=sys.stderr,
                flush=True,
            )
            hub, _, config = source.partition(":")
            loaded = datasets.load_dataset(hub, config or None)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; each is one line for the user
        from fedpeft.data import DATASETS

        raise ConfigError(
            f"dataset {source!r} is not a registered dataset ({', '.join(DATASETS.names())}), a readable local file "
            f"or saved directory, nor a Hugging Face id that loads here ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})"
        ) from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _roles(source: str, names: list[str], columns: tuple[str, ...]) -> dict[str, str]:
    """{role: column}: data.columns first, then each role's usual names."""
    given = {}
    for entry in columns:
        role, sep, column = entry.partition("=")
        if not sep or role.strip() not in ROLES:
            raise ConfigError(f"data.columns entry {entry!r} is not ROLE=COLUMN with ROLE one of {', '.join(ROLES)}")
        if column.strip() not in names:
            raise ConfigError(f"data.columns entry {entry!r}: {source!r} has no column {column.strip()!r} ({names})")
        given[role.strip()] = column.strip()
    taken = set(given.values())
    for role in ROLES:
        if role not in given and (found := next((c for c in USUAL[role] if c in names and c not in taken), None)):
            given[role] = found
            taken.add(found)
    instruction = "prompt" in given and "answer" in given
    need = ("prompt", "answer") if instruction else ("text", "label")
    if missing := [r for r in need if r not in given]:
        raise ConfigError(
            f"dataset {source!r} has no column for {', '.join(missing)} (columns: {names}); name it in data.columns, "
            f'e.g. data.columns = ["{missing[0]}=COLUMN"]'
        )
    keep = ("prompt", "answer", "group") if instruction else ("text", "text_pair", "label", "group")
    return {r: c for r, c in given.items() if r in keep}


def _label_names(feature: Any, values: list[Any]) -> tuple[str, ...]:
    """A ClassLabel's names; else the labels seen, as text (integers in numeric order)."""
    if feature is not None and hasattr(feature, "names"):
        return tuple(feature.names)
    seen = {v for v in values if v is not None and not (isinstance(v, int) and v < 0)}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in seen):
        top = max(seen, default=0)
        if top > 10_000:
            raise ConfigError(f"labels up to {top}: a classifier's labels are class names or indices 0..k-1")
        return tuple(str(i) for i in range(top + 1))
    return tuple(sorted(str(v) for v in seen))


def _text(value: Any, source: str, role: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"dataset {source!r}: its {role} column holds {type(value).__name__}, not text")
    return value


def _instruction(source: str, rows: list[dict[str, list]]) -> TextDataset:
    prompts, answers, groups, test = [], [], [], []
    for part, table in enumerate(rows):
        for i, prompt in enumerate(table["prompt"]):
            if part:
                test.append(len(prompts))
            prompts.append(_text(prompt, source, "prompt"))
            answers.append(_text(table["answer"][i], source, "answer"))
            groups.append(str(table["group"][i]) if "group" in table else Path(source).stem)
    names = tuple(sorted(set(groups)))
    return TextDataset(
        prompts,
        [names.index(g) for g in groups],
        groups,
        names,
        answers=answers,
        test_rows=tuple(test) if test else None,
    )
