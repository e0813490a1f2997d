"""`launch/bench.py data`: how many training windows per second each loader hands a training loop, on CPU.

The same corpus (the standard library's sources) and the same BPE tokenizer (trained here on it)
go through the three ways lsys reads pretraining data:

- shards: prepared once by `lsys.data.prepare` (what `launch/prepare_data.py` runs), read window by window;
- in-memory: map-style data tokenized up front (cached by `datasets`) and held as one token array;
- streaming: the same documents as local parquet files streamed as a hub data set would be, tokenized and
  packed on the loader's thread as training reads them.

Each loader is built by `build_loaders` and wrapped as the trainer wraps it (`PrefetchingLoader`);
the rate is what a training loop that takes batches and does nothing else receives, so it is the
rate of the background threads, single rank. Preparing and up-front tokenizing are timed apart.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lsys.config import model_config
from lsys.data import DataConfig, PrefetchingLoader, build_loaders, build_tokenizer
from lsys.data.config import TokenizerConfig
from lsys.data.prepare import prepare
from lsys.data.sources import load_stdlib
from lsys.hydra_app import compose_config
from lsys.models import build_model

REPO = Path(__file__).resolve().parents[1]
from lsys.train.metrics import PEAK_BF16_FLOPS

EOS_TOKEN = "<|endoftext|>"
H100 = "H100 SXM"


@dataclass
class LoaderRate:
    name: str
    windows_per_s: float
    setup_s: float  # preparing shards, tokenizing up front or writing parquet: before the first batch


def train_tokenizer(path: Path, *, vocab_size: int) -> TokenizerConfig:
    """A byte-level BPE trained on the stdlib corpus, saved at `path`: a stand-in for a real LM tokenizer."""
    documents, _ = load_stdlib(val_fraction=0.0)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator((row["text"] for row in documents), trainer=trainer)
    tokenizer.save(str(path))
    return TokenizerConfig(kind="hf", path=str(path), eos_token=EOS_TOKEN)


def write_parquet(directory: Path, *, files: int) -> None:
    """The stdlib training documents as `files` parquet files: what a hub data set's folder holds."""
    documents, _ = load_stdlib(val_fraction=0.0)
    directory.mkdir(parents=True)
    for index in range(files):
        part = documents.shard(num_shards=files, index=index, contiguous=True)
        part.to_parquet(directory / f"train-{index:05d}.parquet")


def loader_rate(
    name: str, cfg: DataConfig, *, seq_len: int, micro_batch_size: int, seconds: float, setup_s: float
) -> LoaderRate:
    """Windows per second of the training loader that `cfg` gives rank 0 of one, over `seconds` after a warm-up."""
    started = time.perf_counter()
    tokenizer = build_tokenizer(cfg.tokenizer)
    train, _ = build_loaders(
        cfg, seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=0, dp_size=1, seed=0, tokenizer=tokenizer
    )
    setup_s += time.perf_counter() - started
    loader = PrefetchingLoader(train, prefetch_batches=cfg.prefetch_batches, pin_memory=False, name=name)
    try:
        for _ in range(2):  # the threads start, the first documents are read
            next(loader)
        batches, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            next(loader)
            batches += 1
    finally:
        loader.close()
    return LoaderRate(name, batches * micro_batch_size / elapsed, setup_s)


def measure_loaders(
    work_dir: Path, *, seq_len: int, micro_batch_size: int, seconds: float, vocab_size: int
) -> list[LoaderRate]:
    """The three loaders over the stdlib corpus, measured one after another in this process."""
    tokenizer = train_tokenizer(work_dir / "tokenizer.json", vocab_size=vocab_size)
    common = {"tokenizer": tokenizer, "val_fraction": 0.0, "seq_len": seq_len}
    timing = {"seq_len": seq_len, "micro_batch_size": micro_batch_size, "seconds": seconds}

    started = time.perf_counter()
    stdlib = DataConfig(source="stdlib", **common)
    prepare(stdlib, work_dir / "shards", workers=2, shard_tokens=2**24, progress_bar=False)
    shards = DataConfig(name="shards", source="shards", path=str(work_dir / "shards"), **common)
    rates = [loader_rate("shards", shards, setup_s=time.perf_counter() - started, **timing)]

    datasets.disable_caching()  # its setup is build_loaders tokenizing the corpus, not reading an earlier run's cache
    try:
        rates.append(loader_rate("in-memory", stdlib, setup_s=0.0, **timing))
    finally:
        datasets.enable_caching()

    started = time.perf_counter()
    write_parquet(work_dir / "parquet", files=8)
    streaming = DataConfig(name="parquet", source="hub", path=str(work_dir / "parquet"), **common)
    rates.append(loader_rate("streaming", streaming, setup_s=time.perf_counter() - started, **timing))
    return rates


def h100_windows_per_s(model: str, *, seq_len: int, mfu: float) -> tuple[float, float]:
    """(windows/s, FLOPs per token) of `model` training on one H100 SXM at `mfu` of its dense bf16 peak."""
    cfg = model_config(compose_config(REPO / "conf", "config", [f"model={model}"]))
    flops_per_token = build_model(cfg, "meta").flops_per_token(seq_len)
    return PEAK_BF16_FLOPS[H100] * mfu / (flops_per_token * seq_len), flops_per_token
