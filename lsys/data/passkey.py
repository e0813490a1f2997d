"""Generated passkey documents: filler text with a pass key hidden at a random depth, its question and answer.

A document is a needle prompt (`lsys.data.needle_prompts`, variant passkey, filler
haystack) of a random length between seq_len / 2 (or the needle and question plus
MIN_HAYSTACK, if longer) and seq_len, with the needle at a random
depth (at the very start in an eighth of them), followed by its answer and,
when shorter than the window, by more filler: exactly seq_len tokens with its EOS. With the
byte tokenizer (which re-encodes its text token for token) every training window then holds
one whole document. The prompt's length varies so that neither the question nor the needle
sits at a fixed position: a model cannot learn retrieval as "read position p".

With `short_keys` > 0 that share of the documents holds a key of 1 to SHORT_KEY_DIGITS digits
instead of PASSKEY_DIGITS (the eval's). RAT-SWA then starts to retrieve 5-digit keys sooner (README,
passkey recipe), plausibly because a key of a digit or two is easy to carry through a chunk summary,
and the route from the question to the needle's chunk, once learnt on those, serves long keys too.
"""

import itertools
import random

import datasets

from lsys.data.errors import DataError
from lsys.data.needle_prompts import (
    EXTRA_NEW_TOKENS, FILLER, PASSKEY_DIGITS, EvalError, NeedlePrompt, build_prompt,
)
from lsys.data.tokenizer import Tokenizer

MIN_HAYSTACK = 16  # filler tokens the shortest document keeps around its needle
SHORT_KEY_DIGITS = 4  # the longest short key


def passkey_documents(
    *, count: int, seq_len: int, tokenizer: Tokenizer, seed: str, short_keys: float = 0.0
) -> datasets.Dataset:
    """`count` documents of seq_len tokens (with EOS) in a `text` column, the same for the same arguments.

    `short_keys`: the share of documents whose key has 1 to SHORT_KEY_DIGITS digits (each length equally
    likely) rather than PASSKEY_DIGITS.
    """
    if not 0.0 <= short_keys <= 1.0:
        raise DataError(f"data.short_keys must be a share between 0 and 1, got {short_keys}")

    def prompt_of(length: int, depth: float, rng: random.Random, digits: int = PASSKEY_DIGITS) -> NeedlePrompt:
        """A prompt whose tokens, answer and EOS take `length` tokens."""
        try:
            # build_prompt leaves EXTRA_NEW_TOKENS of room after the answer; here that room is the EOS alone.
            return build_prompt(
                tokenizer, variant="passkey", haystack="filler", length=length + EXTRA_NEW_TOKENS - 1,
                depth=depth, rng=rng, passkey_digits=digits,
            )
        except EvalError as error:
            raise DataError(f"data.seq_len {seq_len} is too short for passkey documents: {error}") from None

    # The shortest prompt still keeps some haystack around its needle.
    probe = prompt_of(seq_len, 0.0, random.Random(0))
    needle_and_question = seq_len - (probe.question_start - (probe.needle_end - probe.needle_start))
    shortest = min(seq_len, max(seq_len // 2, needle_and_question + MIN_HAYSTACK))
    filler = tokenizer.encode("." + "".join(itertools.islice(itertools.cycle(FILLER), seq_len)))
    rng = random.Random(f"passkey-{seed}")
    texts = []
    for _ in range(count):
        length = rng.randint(shortest, seq_len)  # of prompt + answer + EOS
        # A needle at the very start is the hardest case for a causal model (nothing comes before
        # its tokens) and uniform depths put only ~5% of needles there: give it an eighth of the documents.
        depth = 0.0 if rng.random() < 1 / 8 else rng.uniform(0, 100)
        # Drawn only when asked for, so that short_keys=0 gives the documents it always gave.
        digits = rng.randint(1, SHORT_KEY_DIGITS) if short_keys and rng.random() < short_keys else PASSKEY_DIGITS
        prompt = prompt_of(length, depth, rng, digits)
        tokens = prompt.tokens + prompt.answer_tokens + filler[: seq_len - length]
        texts.append(tokenizer.decode(tokens))
    return datasets.Dataset.from_dict({"text": texts})
