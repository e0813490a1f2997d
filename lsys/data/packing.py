"""Documents to fixed-length training windows: tokenize, add EOS, lay end to end, cut.

The stream holds every document's ids followed by EOS. Window i has inputs
`stream[i*T : i*T+T]` and targets `stream[i*T+1 : i*T+T+1]` (T = seq_len), so consecutive
windows share one boundary token and every token but the first is a target exactly once.
Windows run across document boundaries; EOS tells the model where one document ends.

Document isolation (`data.doc_isolation`) adds `segment_ids` to each batch: which document of
its window each input token belongs to, counted from 0 at the window start. A document's tokens
are its ids and its closing EOS, so the id of position t is the number of EOS tokens before t
in the window. Targets stay as they are: the target at an EOS is the next document's first
token, but the model predicts it from the EOS's own document only, so each token's loss is still
the loss of its document run alone (the EOS position learns "a document starts here").
"""

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lsys.data.errors import DataError
from lsys.data.tokenizer import Tokenizer

# (inputs, targets), or (inputs, targets, segment_ids) with document isolation; all int64 [B, T].
Batch = tuple[torch.Tensor, ...]

_IDS_FEATURES = datasets.Features({"ids": datasets.List(datasets.Value("int32"))})


def tokenize_documents(
    documents: datasets.Dataset, tokenizer: Tokenizer, *, num_proc: int, desc: str
) -> datasets.Dataset:
    """One `ids` row per document, EOS appended; cached by `datasets` under the documents' and tokenizer's hash."""
    return documents.map(
        _tokenize_batch,
        batched=True,
        input_columns="text",
        remove_columns=documents.column_names,
        fn_kwargs={"tokenizer": tokenizer},
        features=_IDS_FEATURES,
        num_proc=num_proc if num_proc > 1 else None,
        desc=desc,
    )


def token_stream(tokenized: datasets.Dataset, *, shuffle_seed: int | None) -> np.ndarray:
    """All documents' ids end to end (int32), in a seeded random document order, or stored order if None."""
    ids = tokenized.with_format("arrow")[:]["ids"]  # a chunked list column; the slice applies any row selection
    if shuffle_seed is not None:
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(shuffle_seed))
        ids = ids.take(pa.array(order.numpy()))
    # Arrow flattens the list column in one vectorized pass; torch needs a writable array.
    return np.require(pc.list_flatten(ids).to_numpy(), dtype=np.int32, requirements=["C", "W"])


def check_batch_layout(*, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    """Raises DataError unless seq_len, batch size and the dp rank/size make sense."""
    if seq_len < 1 or micro_batch_size < 1 or dp_size < 1:
        raise DataError(
            f"seq_len ({seq_len}), micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) must be positive"
        )
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")


def segment_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each input token's document within its window (int64, same shape): the EOS tokens before it in its row."""
    ends = (inputs == eos_id).long()
    # Exclusive cumulative sum: an EOS closes its own document, so the count steps up after it.
    return ends.cumsum(dim=-1) - ends


def window_batch(rows: torch.Tensor, eos_id: int | None) -> Batch:
    """The batch of rows of seq_len + 1 tokens: (inputs, targets), plus segment_ids when eos_id is given."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    if eos_id is None:
        return inputs, targets
    return inputs, targets, segment_ids(inputs, eos_id)


class TokenWindows:
    """A token stream seen as windows of seq_len inputs, each with its targets shifted by one."""

    def __init__(self, tokens: np.ndarray, seq_len: int, *, eos_id: int | None = None):
        self.tokens = torch.from_numpy(tokens)
        self.seq_len = seq_len
        self.eos_id = eos_id  # given: batches carry segment_ids (document isolation)
        # The last window needs one token past its inputs for its final target.
        self.count = max(0, (len(tokens) - 1) // seq_len)

    def batch(self, window_ids: torch.Tensor) -> Batch:
        """The batch (int64 `[len(window_ids), seq_len]` each) of the given windows; see `window_batch`."""
        positions = window_ids[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        return window_batch(self.tokens[positions].long(), self.eos_id)


def _tokenize_batch(texts: list[str], tokenizer: Tokenizer) -> dict[str, list[list[int]]]:
    ids = tokenizer.encode_batch(texts)
    for document in ids:
        document.append(tokenizer.eos_id)
    return {"ids": ids}
