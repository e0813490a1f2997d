"""Generated passkey documents: filler text with a pass key hidden at a random depth, its question and answer.

A document is a prompt of the needle eval (`lsys.eval.needle`, variant passkey, filler
haystack) of a random length between seq_len / 2 and seq_len, with the needle at a random
depth (at the very start in an eighth of them), followed by its answer and,
when shorter than the window, by more filler: exactly seq_len tokens with its EOS. With the
byte tokenizer (which re-encodes its text token for token) every training window then holds
one whole document. The prompt's length varies so that neither the question nor the needle
sits at a fixed position: a model cannot learn retrieval as "read position p".
"""

import itertools
import random

import datasets

from lsys.data.errors import DataError
from lsys.data.tokenizer import Tokenizer


def passkey_documents(*, count: int, seq_len: int, tokenizer: Tokenizer, seed: str) -> datasets.Dataset:
    """`count` documents of seq_len tokens (with EOS) in a `text` column, the same for the same arguments."""
    # Imported here: lsys.eval.needle imports lsys.data, so a module-level import would be circular.
    from lsys.eval.needle import EXTRA_NEW_TOKENS, FILLER, EvalError, build_prompt

    filler = tokenizer.encode("." + "".join(itertools.islice(itertools.cycle(FILLER), seq_len)))
    rng = random.Random(f"passkey-{seed}")
    texts = []
    for _ in range(count):
        length = rng.randint(seq_len // 2, seq_len)  # of prompt + answer + EOS
        # A needle at the very start is the hardest case for a causal model (nothing comes before
        # its tokens) and uniform depths put only ~5% of needles there: give it an eighth of the documents.
        depth = 0.0 if rng.random() < 1 / 8 else rng.uniform(0, 100)
        try:
            # build_prompt leaves EXTRA_NEW_TOKENS of room after the answer; here that room is the EOS alone.
            prompt = build_prompt(
                tokenizer, variant="passkey", haystack="filler", length=length + EXTRA_NEW_TOKENS - 1,
                depth=depth, rng=rng,
            )
        except EvalError as error:
            raise DataError(f"data.seq_len {seq_len} is too short for passkey documents: {error}") from None
        tokens = prompt.tokens + prompt.answer_tokens + filler[: seq_len - length]
        texts.append(tokenizer.decode(tokens))
    return datasets.Dataset.from_dict({"text": texts})
