"""Text calibration data for language models: documents in, token batches out.

``text_batches(source, tokenizer, ...)`` takes a text file (``.txt``, ``.jsonl``/``.json``,
``.csv``, ``.parquet``), a directory written by ``datasets.Dataset.save_to_disk``, or a
``datasets.Dataset``, and returns a sized, re-iterable sequence of batches
``{"input_ids": LongTensor[B, L], "attention_mask": LongTensor[B, L]}``.

Files are read with the ``datasets`` library into Arrow tables that are memory-mapped, and
documents are tokenized one batch at a time as the batches are consumed, so memory does not
grow with the file and only the documents calibration uses are tokenized.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError, first_line

# Suffix -> the ``datasets`` packaged reader; none of them needs the network.
READERS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


def is_text_source(path: str | Path) -> bool:
    """Whether ``path`` is something ``text_batches`` reads (by suffix, or a directory)."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in READERS


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a GGUF file (its first four bytes are ``GGUF``), whatever its name:
    llama.cpp's format, holding a model and its tokenizer (``loading`` reads the model)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` from a local directory (or the tokenizer stored
    in a GGUF model file), as a one-line error.

    Code shipped with the tokenizer (``auto_map`` in its ``tokenizer_config.json`` or
    ``config.json``) runs only with ``trust_remote_code``; without it transformers is told so
    explicitly, as otherwise it would ask on stdin whether to run the code.
    """
    path = Path(path)
    gguf = is_gguf(path)  # False for a directory
    if not path.is_dir() and not gguf:
        raise ConfigError(
            f"tokenizer {path}: not a directory (save_pretrained writes one) nor a GGUF file"
        )
    from transformers import AutoTokenizer

    where = {"gguf_file": path.name} if gguf else {}
    try:
        return AutoTokenizer.from_pretrained(
            str(path.parent if gguf else path), local_files_only=True,
            trust_remote_code=trust_remote_code, **where,
        )  # fmt: skip
    except Exception as err:
        reason = first_line(err, typed=True)
        if "custom code" in reason or "trust_remote_code" in reason:
            reason = (
                "it ships its own code (auto_map), which runs only with --trust-remote-code "
                "(trust_remote_code=True): pass it only if you trust the directory"
            )
        raise ConfigError(f"cannot load a tokenizer from {path}: {reason}") from err


def text_batches(
    source: str | Path | Any,
    tokenizer: Any,
    *,
    max_length: int = 512,
    batch_size: int = 8,
    text_column: str = "text",
    one_per_line: bool = False,
    pack: bool = False,
    num_samples: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> TextBatches:
    """Token batches of the documents in ``source``, for ``evagraph.transform``/``calibrate``.

    ``source``: a path (``.txt``: documents separated by blank lines, or one per line with
    ``one_per_line``; ``.jsonl``/``.json``/``.csv``/``.parquet``: the column ``text_column``,
    or a ``messages`` column of chat turns rendered with the tokenizer's chat template; a
    ``save_to_disk`` directory) or a ``datasets.Dataset``. ``tokenizer``: a Hugging Face
    tokenizer. Each document is one sample truncated to ``max_length`` tokens, and a batch is
    padded to its longest with the pad token (eos if there is none) and ``attention_mask`` 0
    there, so the padding is left out of the statistics. ``pack``: the documents are joined
    (eos between them) and cut into full ``max_length`` chunks, without padding.
    ``num_samples``: at most that many samples. ``shuffle``: the documents in a random order
    drawn from ``seed``.
    """
    if max_length <= 0:
        raise ConfigError(f"max_length must be positive, got {max_length}")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if num_samples is not None and num_samples <= 0:
        raise ConfigError(f"num_samples must be positive, got {num_samples}")
    dataset, name = _read(source, one_per_line)
    dataset = dataset.with_format(None)  # rows as Python objects, whatever format it was given
    column = _column(dataset, text_column, name)
    if column == "messages" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{name} holds chat messages, but the tokenizer has no chat template to render them"
        )
    if column != "messages":
        _check_text(dataset, column, name)
        dataset = _drop_blank(dataset, column, name)
    if len(dataset) == 0:
        raise DataError(f"calibration data {name} holds no documents")
    if shuffle:
        dataset = dataset.shuffle(seed=seed)  # an index mapping; the rows stay on disk
    if not pack and num_samples is not None and num_samples < len(dataset):
        dataset = dataset.select(range(num_samples))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None and not pack:
        raise ConfigError("the tokenizer has neither a pad nor an eos token to pad batches with")
    if pack and tokenizer.eos_token_id is None:
        raise ConfigError("pack needs the tokenizer's eos token to separate documents")
    return TextBatches(
        dataset, column, tokenizer, name, max_length, batch_size, pack, num_samples, pad
    )


class TextBatches:
    """The batches ``text_batches`` returns: sized and re-iterable; each pass tokenizes anew."""

    def __init__(
        self,
        dataset: Any,
        column: str,
        tokenizer: Any,
        name: str,
        max_length: int,
        batch_size: int,
        pack: bool,
        num_samples: int | None,
        pad_id: int | None,
    ) -> None:
        self.dataset, self.column, self.tokenizer, self.name = dataset, column, tokenizer, name
        self.max_length, self.batch_size, self.pack = max_length, batch_size, pack
        self.num_samples, self.pad_id = num_samples, pad_id
        self._chunks: int | None = None  # pack: the number of chunks, counted once

    def __len__(self) -> int:
        return -(-self.samples() // self.batch_size)

    def samples(self) -> int:
        """How many samples (sequences) a pass yields."""
        if not self.pack:
            return len(self.dataset)
        if self._chunks is None:
            # The number of chunks is only known from the token count: count once, stopping
            # when ``num_samples`` chunks are reached (the whole source without it).
            cap = None if self.num_samples is None else self.num_samples * self.max_length
            tokens = 0
            for ids in self._documents():
                tokens += len(ids) + 1
                if cap is not None and tokens >= cap:
                    break
            self._chunks = min(tokens // self.max_length, self.num_samples or tokens)
            if self._chunks == 0:
                raise DataError(
                    f"calibration data {self.name} holds fewer than max_length="
                    f"{self.max_length} tokens: not one packed sample"
                )
        return self._chunks

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._packed() if self.pack else self._padded()

    def _texts(self, start: int, stop: int) -> list[str]:
        rows = self.dataset[start:stop][self.column]
        if self.column != "messages":
            return [str(t) for t in rows]
        try:
            return [self.tokenizer.apply_chat_template(m, tokenize=False) for m in rows]
        except Exception as err:
            raise DataError(
                f"{self.name}: the tokenizer's chat template cannot render a row of "
                f"'messages' ({first_line(err, typed=True)})"
            ) from err

    def _encode(self, texts: list[str], truncate: bool) -> list[list[int]]:
        """Token ids of ``texts``: at most ``max_length`` each with ``truncate``, else all.

        A tokenizer reads a text whole even when it truncates, so a document of megabytes
        (one line of a .jsonl) would cost time and memory for tokens never used: truncated
        texts are cut to ``max_length * _CHARS_PER_TOKEN`` characters first (before a
        whitespace, so the words kept tokenize as in the whole text; cut longer where that
        gives too few tokens), and whole ones are tokenized in pieces of ``_PIECE``.
        """
        # A chat template writes its own special tokens (BOS); adding them again would double.
        special = self.column != "messages"
        if not truncate:  # short texts in one call, long ones piece by piece
            out = self._tokenize([t if len(t) <= _PIECE else "" for t in texts], special, False)
            return [
                self._long(t, special) if len(t) > _PIECE else ids for t, ids in zip(texts, out)
            ]
        limit = self.max_length * _CHARS_PER_TOKEN
        out = self._tokenize([_head(t, limit) for t in texts], special, truncate=True)
        for i, text in enumerate(texts):
            cut = limit
            while len(out[i]) < self.max_length and len(text) > cut:  # tokens of many chars
                cut *= 8
                out[i] = self._tokenize([_head(text, cut)], special, truncate=True)[0]
        return out

    def _tokenize(self, texts: list[str], special: bool, truncate: bool) -> list[list[int]]:
        kwargs = {"truncation": True, "max_length": self.max_length} if truncate else {}
        return self.tokenizer(texts, add_special_tokens=special, **kwargs)["input_ids"]

    def _long(self, text: str, special: bool) -> list[int]:
        """All token ids of a long ``text``, tokenized piece by piece (cut before whitespace)
        and wrapped in the special tokens the tokenizer adds around a text."""
        ids = [i for piece in _pieces(text) for i in self._tokenize([piece], False, False)[0]]
        if not special:
            return ids
        marked, plain = (self._tokenize(["a"], flag, False)[0] for flag in (True, False))
        at = next(
            (j for j in range(len(marked) - len(plain) + 1) if marked[j : j + len(plain)] == plain),
            None,
        )
        if at is None:  # special tokens inside the text itself: no piecewise equivalent
            return self._tokenize([text], special, truncate=False)[0]
        return marked[:at] + ids + marked[at + len(plain) :]

    def _documents(self, step: int = 64) -> Iterator[list[int]]:
        for start in range(0, len(self.dataset), step):
            yield from self._encode(self._texts(start, start + step), truncate=False)

    def _padded(self) -> Iterator[dict[str, torch.Tensor]]:
        right = getattr(self.tokenizer, "padding_side", "right") != "left"
        for start in range(0, len(self.dataset), self.batch_size):
            seqs = self._encode(self._texts(start, start + self.batch_size), truncate=True)
            width = max(1, max(len(s) for s in seqs))
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                where = slice(0, len(s)) if right else slice(width - len(s), width)
                ids[i, where] = torch.tensor(s, dtype=torch.long)
                mask[i, where] = 1
            yield {"input_ids": ids, "attention_mask": mask}

    def _packed(self) -> Iterator[dict[str, torch.Tensor]]:
        total, length, eos = self.samples(), self.max_length, self.tokenizer.eos_token_id
        buffer: list[int] = []
        chunks: list[list[int]] = []
        done = 0
        for ids in self._documents():
            buffer += ids + [eos]
            while len(buffer) >= length and done + len(chunks) < total:
                chunks.append(buffer[:length])
                buffer = buffer[length:]
                if len(chunks) == self.batch_size:
                    yield self._stack(chunks)
                    done, chunks = done + len(chunks), []
            if done + len(chunks) >= total:
                break
        if chunks:
            yield self._stack(chunks)

    @staticmethod
    def _stack(chunks: list[list[int]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor(chunks, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# A bound on characters per token far above any tokenizer's average (about 4 for English).
_CHARS_PER_TOKEN = 32
_PIECE = 1 << 16  # characters tokenized at once when a whole long document is needed


def _head(text: str, limit: int) -> str:
    """The start of ``text``, at most ``limit`` characters, cut before a whitespace where
    there is one in the second half (so no word is split)."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = max(head.rfind(c) for c in " \n\t")
    return head[:cut] if cut > limit // 2 else head


def _pieces(text: str) -> Iterator[str]:
    """``text`` in consecutive pieces of about ``_PIECE`` characters (see ``_head``)."""
    while text:
        piece = _head(text, _PIECE)
        yield piece
        text = text[len(piece) :]


def _read(source: Any, one_per_line: bool) -> tuple[Any, str]:
    """``source`` as a ``datasets.Dataset`` and the name errors call it by."""
    import datasets  # its packaged readers of local files never go to the network

    if isinstance(source, datasets.Dataset):
        return source, "the dataset"
    if isinstance(source, datasets.DatasetDict):
        return _split(source, "the dataset"), "the dataset"
    path = Path(source)
    if path.is_dir():
        _check_saved_dataset(path)
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:
            raise DataError(
                f"calibration data {path} is a directory but not a saved dataset "
                f"(datasets.Dataset.save_to_disk): {first_line(err, typed=True)}"
            ) from err
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _split(loaded, str(path))
        return loaded, str(path)
    if not path.is_file():
        raise DataError(f"calibration data file not found: {path}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"calibration data {path}: unknown format {path.suffix!r} (text: "
            f"{', '.join(READERS)} or a saved dataset directory; tensors: .pt, .safetensors)"
        )
    if path.stat().st_size == 0:
        raise DataError(f"calibration data {path} is an empty file (0 bytes)")
    extra: dict[str, Any] = {}
    if reader == "text":
        extra["sample_by"] = "line" if one_per_line else "paragraph"
    if reader in ("text", "json"):
        extra["chunksize"] = 1 << 20  # read 1 MB at a time (10 MB by default): a smaller peak
    # datasets logs a parse error on its own line before raising a generic one: the reason is
    # told once, in the DataError, from the error's cause.
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        dataset = datasets.load_dataset(reader, data_files=str(path), split="train", **extra)
    except Exception as err:
        raise DataError(
            f"cannot read calibration data {path}: {first_line(_root_cause(err), typed=True)}"
        ) from err
    finally:
        datasets.logging.set_verbosity(verbosity)
    return dataset, str(path)


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception ``err`` was raised from (``raise ... from``: datasets wraps a
    parse error in a ``DatasetGenerationError`` that says only that one occurred)."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    return err


def _check_saved_dataset(path: Path) -> None:
    """Refuse a ``save_to_disk`` directory whose JSON names files outside it (a split
    ``../x``, a data file ``/etc/...`` or a symlink out): ``load_from_disk`` would read them.
    """
    import json

    root = Path(os.path.realpath(path))

    def inside(name: Any, where: Path, what: str) -> Path:
        target = Path(os.path.realpath(where / name)) if isinstance(name, str) else None
        if target is None or root not in target.parents:
            raise DataError(f"calibration data {path}: {what} {name!r} is not inside the directory")
        return target

    def read(file: Path, key: str) -> list:
        try:
            value = json.loads(file.read_text())[key]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"calibration data {path}: cannot read {file.name}: {err}") from err
        if not isinstance(value, list):
            raise DataError(f"calibration data {path}: {file.name}: {key!r} must be a list")
        return value

    folders = [root]
    if (root / "dataset_dict.json").is_file():
        splits = read(root / "dataset_dict.json", "splits")
        folders = [inside(split, root, "split") for split in splits]
    for folder in folders:
        if (folder / "state.json").is_file():
            for entry in read(folder / "state.json", "_data_files"):
                name = entry.get("filename") if isinstance(entry, dict) else None
                inside(name, folder, "data file")


def _split(found: Mapping[str, Any], name: str) -> Any:
    """A ``DatasetDict``'s ``train`` split, or its only one."""
    if "train" in found:
        return found["train"]
    if len(found) == 1:
        return next(iter(found.values()))
    raise DataError(f"{name} holds several splits ({', '.join(found)}) and none is 'train'")


def _column(dataset: Any, text_column: str, name: str) -> str:
    columns = list(dataset.column_names)
    if text_column in columns:
        return text_column
    if "messages" in columns:
        return "messages"
    raise DataError(
        f"{name} has no column {text_column!r} (nor 'messages'); its columns: "
        f"{', '.join(columns) or 'none'} (choose one with text_column / --text-column)"
    )


def _check_text(dataset: Any, column: str, name: str) -> None:
    """Refuse a ``column`` that does not hold strings: numbers (a .json of ``[1, 2, 3]``) or
    mixed values would otherwise become documents such as "1"."""
    import datasets

    feature = dataset.features.get(column)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return
    holds = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
    raise DataError(
        f"calibration data {name}: column {column!r} holds {holds} values, not text (every "
        "document must be a string)"
    )


def _drop_blank(dataset: Any, column: str, name: str) -> Any:
    """The rows whose text is not blank (blank lines in a ``.txt``, empty cells).

    Computed with Arrow over the memory-mapped table, keeping only an index mapping."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def keep(table: pa.Table) -> pa.Array:
        text = pc.cast(table[column], pa.string())
        return pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0), False)

    try:
        return dataset.with_format("arrow").filter(keep, batched=True).with_format(None)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise DataError(
            f"calibration data {name}: column {column!r} is not text "
            f"({first_line(err, typed=True)})"
        ) from err
