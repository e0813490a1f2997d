"""Generated passkey documents: filler text with a pass key hidden at a random depth, then its question and answer.

Each document is a prompt of the needle eval (`lsys.eval.needle`, variant passkey, filler
haystack) followed by its answer: the exact distribution the eval scores, at the training
length. A document is sized so that with its EOS it takes exactly seq_len tokens; with the
byte tokenizer (which re-encodes its text token for token) every training window then holds
one whole document, and the answer always sits at the end of the window.
"""

import random

import datasets

from lsys.data.errors import DataError
from lsys.data.tokenizer import Tokenizer


def passkey_documents(*, count: int, seq_len: int, tokenizer: Tokenizer, seed: str) -> datasets.Dataset:
    """`count` documents of seq_len tokens (with EOS) in a `text` column, the same for the same arguments."""
    # Imported here: lsys.eval.needle imports lsys.data, so a module-level import would be circular.
    from lsys.eval.needle import EXTRA_NEW_TOKENS, EvalError, build_prompt

    rng = random.Random(f"passkey-{seed}")
    texts = []
    for _ in range(count):
        # build_prompt leaves EXTRA_NEW_TOKENS of room after the answer; here that room is the EOS alone.
        try:
            prompt = build_prompt(
                tokenizer, variant="passkey", haystack="filler", length=seq_len + EXTRA_NEW_TOKENS - 1,
                depth=rng.uniform(0, 100), rng=rng,
            )
        except EvalError as error:
            raise DataError(f"data.seq_len {seq_len} is too short for passkey documents: {error}") from None
        texts.append(tokenizer.decode(prompt.tokens + prompt.answer_tokens))
    return datasets.Dataset.from_dict({"text": texts})
