"""Text data for training: sources, tokenizers, packing into windows, and dp-sharded loaders."""

from lsys.data.config import DataConfig
from lsys.data.errors import DataError
from lsys.data.loader import PackedLoader, SequenceSlices, ValLoader, build_loaders
from lsys.data.packing import segment_ids
from lsys.data.sources import load_source
from lsys.data.streaming import StreamingLoader, StreamingValLoader
from lsys.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "HFTokenizer",
    "PackedLoader",
    "SequenceSlices",
    "StreamingLoader",
    "StreamingValLoader",
    "Tokenizer",
    "ValLoader",
    "build_loaders",
    "build_tokenizer",
    "load_source",
    "segment_ids",
]
