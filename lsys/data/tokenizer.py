"""Tokenizers: raw UTF-8 bytes (the default) or a Hugging Face `tokenizers` JSON file."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import tokenizers

from lsys.data.errors import DataError


class Tokenizer(Protocol):
    """What the data pipeline and generation need from a tokenizer."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without EOS or any other special token."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; EOS and other special tokens are dropped."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and EOS as 256: no file, no training, every text round-trips."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids; EOS is dropped, a cut multi-byte character becomes U+FFFD."""
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text."""
        return [list(text.encode("utf-8")) for text in texts]


class HFTokenizer:
    """A `tokenizers` JSON file (e.g. a trained BPE) whose vocabulary holds `eos_token`."""

    def __init__(self, path: str | Path, eos_token: str):
        if not Path(path).is_file():
            raise DataError(f"tokenizer.path '{path}' does not exist")
        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        eos_id = self._tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(
                f"tokenizer.eos_token '{eos_token}' is not in the vocabulary of '{path}'; "
                "add it as a special token when training the tokenizer, or name one it has"
            )
        self.eos_id: int = eos_id
        # Added (special) tokens count: the model's embedding must hold every id the tokenizer can emit.
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; the tokenizer's own BOS/EOS templates are not applied."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, run in parallel by `tokenizers`."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def build_tokenizer(cfg: Any) -> Tokenizer:
    """The tokenizer a config names: `kind: byte`, or `kind: hf` with `path` and `eos_token`."""
    kind = getattr(cfg, "kind", None)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        path, eos_token = getattr(cfg, "path", None), getattr(cfg, "eos_token", None)
        if not path or not eos_token:
            raise DataError(f"tokenizer kind 'hf' needs path and eos_token (got {path!r} and {eos_token!r})")
        return HFTokenizer(path, eos_token)
    raise DataError(f"tokenizer.kind '{kind}' is unknown; expected 'byte' or 'hf'")
