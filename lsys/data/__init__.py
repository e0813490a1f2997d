"""Data for training: sources, tokenizers, packing into windows (text, and SFT examples), and dp-sharded loaders."""

from lsys.data.chat import load_chat_template
from lsys.data.config import DataConfig
from lsys.data.errors import DataError
from lsys.data.loader import PackedLoader, SequenceSlices, ValLoader, build_loaders, chat_template_of
from lsys.data.packing import segment_ids
from lsys.data.prefetch import PrefetchingLoader
from lsys.data.sft import ExampleWindows
from lsys.data.sources import load_examples, load_source
from lsys.data.streaming import StreamingLoader, StreamingValLoader
from lsys.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "ExampleWindows",
    "HFTokenizer",
    "PackedLoader",
    "PrefetchingLoader",
    "SequenceSlices",
    "StreamingLoader",
    "StreamingValLoader",
    "Tokenizer",
    "ValLoader",
    "build_loaders",
    "build_tokenizer",
    "chat_template_of",
    "load_chat_template",
    "load_examples",
    "load_source",
    "segment_ids",
]
