"""Needle prompts: facts hidden at a chosen depth of a long text, then asked for.

The needle eval (`lsys.eval.needle`) scores models on these prompts and the passkey source
(`lsys.data.passkey`) trains on them; this module builds them and imports nothing of either.

A prompt is built on token ids, with the model's own tokenizer:

    haystack[:cut] + needle(s) + haystack[cut:] + question      and then the answer

The haystack is a run of text units (lines of the standard library's `.py` files, or the
sentences of the classic passkey filler), encoded once as one text. Its boundaries are the token
positions right after each token whose text ends a unit (holds a line's newline, or a filler
sentence's full stop), found with the model's own tokenizer. The needle, shaped like one more
unit and encoded on its own, goes in at the boundary nearest to `depth`% of the haystack
(0 = before it, 100 = right before the question), so no token of the text around it changes.

Prompt and answer fill the context length exactly: the haystack gets what the needles, the
question, the answer and `EXTRA_NEW_TOKENS` of room for generation leave, cut from its front.
So a model never sees more than `length` tokens, whether it is fed the answer or generates it.

Variants (RULER's NIAH tasks, and the passkey test of Mohtashami & Jaggi):
- `passkey`:    "The pass key is 12345. Remember it. 12345 is the pass key." -> "12345"
- `single`:     "One of the special magic numbers for quiet-river is: 1234567." -> "1234567"
- `multikey`:   `single` plus `DISTRACTORS` needles of other keys at other unit starts
- `multivalue`: `VALUES` needles of one key, one after another at the depth; the answer is
                the values in the order they appear, joined by ", ": "1234567, 2345678, ..."
"""

import functools
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lsys.data.stdlib import stdlib_files
from lsys.data.tokenizer import Tokenizer

VARIANTS = ("passkey", "single", "multikey", "multivalue")
HAYSTACKS = ("stdlib", "filler")

# Generation may run this many tokens past the answer (string match finds the answer anywhere in
# the output), so every prompt leaves room for them.
EXTRA_NEW_TOKENS = 4
PASSKEY_DIGITS = 5  # as Mohtashami & Jaggi's passkey; the eval always asks for this many
DISTRACTORS = 3  # multikey: 4 keys in all, as RULER's niah_multikey_1
VALUES = 4  # multivalue: as RULER's niah_multivalue

# The classic passkey filler, one unit per sentence. A space starts each unit rather than ends it:
# BPE tokenizers attach a space to the word after it, so a sentence then ends on its own "." token.
FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.", " There and back again.")
# What ends a unit of each haystack, and how a needle sentence is made into a unit.
UNIT_END = {"filler": ".", "stdlib": "\n"}
AS_UNIT = {"filler": " {}", "stdlib": "{}\n"}

PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
MAGIC_NEEDLE = "One of the special magic numbers for {key} is: {value}."
SINGLE_QUESTION = "\nWhat is the special magic number for {key}? The special magic number for {key} is"
MULTIVALUE_QUESTION = "\nWhat are all the special magic numbers for {key}? The special magic numbers for {key} are"

# Keys are adjective-noun pairs ("quiet-river"): ordinary words, so any tokenizer spells them compactly.
_ADJECTIVES = ("quiet", "bright", "hollow", "amber", "silent", "rapid", "gentle", "frozen", "golden", "narrow")
_NOUNS = ("river", "forest", "lantern", "harbor", "meadow", "canyon", "falcon", "garden", "island", "bridge")
KEYS = tuple(f"{adjective}-{noun}" for adjective in _ADJECTIVES for noun in _NOUNS)


class EvalError(ValueError):
    """An evaluation setting that cannot be used; the message names the bad value and the fix."""


@dataclass(frozen=True)
class NeedlePrompt:
    """One prompt and its answer; positions index `tokens`."""

    tokens: list[int]  # the haystack with the needles in it, then the question
    answer_tokens: list[int]  # what should follow: " " + the values joined by ", "
    values: tuple[str, ...]  # every value the answer names, in order
    needle_start: int  # where the asked needle (multivalue: the first of them) begins
    needle_end: int  # and where it (the last of them) ends
    question_start: int  # where the question begins: the end of the haystack


def build_prompt(
    tokenizer: Tokenizer, *, variant: str, haystack: str, length: int, depth: float, rng: random.Random,
    passkey_digits: int = PASSKEY_DIGITS,
) -> NeedlePrompt:
    """A needle prompt whose tokens plus answer plus EXTRA_NEW_TOKENS fill exactly `length` tokens.

    `passkey_digits`: the length of a passkey (variant passkey only; training documents, lsys/data/passkey.py).
    """
    if passkey_digits < 1:
        raise EvalError(f"a passkey needs at least one digit, got passkey_digits={passkey_digits}")
    asked, distractors, question, values = _needles(variant, rng, passkey_digits)
    as_unit = AS_UNIT[haystack]
    asked_tokens = tokenizer.encode("".join(as_unit.format(sentence) for sentence in asked))
    distractor_tokens = [tokenizer.encode(as_unit.format(sentence)) for sentence in distractors]
    question_tokens = tokenizer.encode(question)
    answer_tokens = tokenizer.encode(" " + ", ".join(values))
    fixed = len(asked_tokens) + sum(map(len, distractor_tokens)) + len(question_tokens)
    fixed += len(answer_tokens) + EXTRA_NEW_TOKENS
    budget = length - fixed
    if budget < 1:
        raise EvalError(
            f"context length {length} is too short for the {variant} needle: its needles, question, answer and "
            f"{EXTRA_NEW_TOKENS} tokens of generation room take {fixed} tokens; use a length above {fixed}"
        )
    hay = _haystack_tokens(tokenizer, haystack, budget, rng)
    boundaries = unit_boundaries(tokenizer, hay, UNIT_END[haystack])
    cut = min(boundaries, key=lambda b: abs(b - depth / 100 * budget))  # ties go to the earlier boundary
    # Distractors go to other boundaries, so the asked needle stays exactly where the depth puts it.
    elsewhere = [b for b in boundaries if b != cut] or [cut]
    inserts = [(cut, True, asked_tokens)] + [(rng.choice(elsewhere), False, ids) for ids in distractor_tokens]
    tokens: list[int] = []
    done = 0
    for position, is_asked, ids in sorted(inserts, key=lambda insert: insert[0]):  # stable: asked first at `cut`
        tokens += hay[done:position]
        if is_asked:
            needle_start = len(tokens)
        tokens += ids
        done = position
    tokens += hay[done:]
    question_start = len(tokens)
    return NeedlePrompt(
        tokens=tokens + question_tokens,
        answer_tokens=answer_tokens,
        values=values,
        needle_start=needle_start,
        needle_end=needle_start + len(asked_tokens),
        question_start=question_start,
    )


def _needles(
    variant: str, rng: random.Random, passkey_digits: int
) -> tuple[list[str], list[str], str, tuple[str, ...]]:
    """(asked needle sentences, distractor sentences, question, values) of one sample."""
    if variant == "passkey":
        value = str(rng.randint(10 ** (passkey_digits - 1), 10**passkey_digits - 1))
        return [PASSKEY_NEEDLE.format(value=value)], [], PASSKEY_QUESTION, (value,)
    keys = rng.sample(KEYS, 1 + DISTRACTORS)
    numbers = [str(n) for n in rng.sample(range(1_000_000, 10_000_000), VALUES + DISTRACTORS)]  # 7 digits, distinct
    key = keys[0]
    if variant == "multivalue":
        values = tuple(numbers[:VALUES])
        needles = [MAGIC_NEEDLE.format(key=key, value=value) for value in values]
        return needles, [], MULTIVALUE_QUESTION.format(key=key), values
    distractors = []
    if variant == "multikey":
        distractors = [MAGIC_NEEDLE.format(key=k, value=v) for k, v in zip(keys[1:], numbers[VALUES:])]
    value = numbers[0]
    return [MAGIC_NEEDLE.format(key=key, value=value)], distractors, SINGLE_QUESTION.format(key=key), (value,)


def _haystack_tokens(tokenizer: Tokenizer, source: str, budget: int, rng: random.Random) -> list[int]:
    """The last `budget` tokens of a haystack text of whole units, encoded once."""
    units = _units(source, rng)
    text = ""
    chars = budget  # a first guess; the text doubles until it encodes to enough tokens
    while True:
        for unit in units:
            text += unit
            if len(text) >= chars:
                break
        tokens = tokenizer.encode(text)
        if len(tokens) >= budget:
            # Cut from the front: the text then ends on a whole unit, right where a depth-100 needle goes.
            return tokens[len(tokens) - budget :]
        if len(text) < chars:  # the source ran out
            raise EvalError(f"the {source} haystack holds {len(tokens)} tokens, fewer than the {budget} needed")
        chars *= 2


def unit_boundaries(tokenizer: Tokenizer, tokens: list[int], unit_end: str) -> list[int]:
    """Positions where a needle can go: 0, the end, and right after each token whose text holds `unit_end`."""
    # "Holds", not "ends with": some BPE vocabularies merge a newline with the next line's indentation.
    ends_a_unit = {token: unit_end in tokenizer.decode([token]) for token in set(tokens)}
    return [0] + [i + 1 for i, token in enumerate(tokens[:-1]) if ends_a_unit[token]] + [len(tokens)]


def _units(source: str, rng: random.Random) -> Iterator[str]:
    """Haystack units in reading order: filler sentences without end, or stdlib lines from a seeded file and line."""
    if source == "filler":
        yield from itertools.cycle(FILLER)
        return
    files = _stdlib_files()
    first = rng.randrange(len(files))
    for index in range(first, first + len(files)):  # one round through the corpus
        try:
            lines = files[index % len(files)].read_text(encoding="utf-8").splitlines(keepends=True)
        except UnicodeDecodeError:
            continue  # the stdlib holds a few latin-1 test files
        if index == first and lines:
            lines = lines[rng.randrange(len(lines)) :]
        yield from lines


@functools.cache
def _stdlib_files() -> tuple[Path, ...]:
    # Listing the stdlib takes ~0.4 s; a grid asks for it once per prompt.
    return tuple(stdlib_files())
