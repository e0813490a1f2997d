"""Needle retrieval: facts hidden at a chosen depth of a long text, then asked for, and the answers scored.

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
So the model never sees more than `length` tokens, under either scoring, and both scorings read
the same prompts.

Variants (RULER's NIAH tasks, and the passkey test of Mohtashami & Jaggi):
- `passkey`:    "The pass key is 12345. Remember it. 12345 is the pass key." -> "12345"
- `single`:     "One of the special magic numbers for quiet-river is: 1234567." -> "1234567"
- `multikey`:   `single` plus `DISTRACTORS` needles of other keys at other unit starts
- `multivalue`: `VALUES` needles of one key, one after another at the depth; the answer is
                the values in the order they appear, joined by ", ": "1234567, 2345678, ..."

Scorings:
- `teacher_forced`: prompt and answer go in; correct when the model's argmax at every answer
  position is the answer token (exact match). Also gives the answer loss: the mean negative
  log-likelihood (nats) of the answer tokens that spell the values (a separator token of its
  own, like the leading space, left out), which moves long before exact match does. For a
  5-digit passkey with byte tokens, chance is (ln 9 + 4 ln 10) / 5 = 2.28.
- `generate`: greedy decoding of len(answer) + EXTRA_NEW_TOKENS tokens; correct when every value
  occurs in the decoded text (RULER's string match).
"""

import functools
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from lsys.config import sequence_parallel_multiple
from lsys.data.sources import stdlib_files
from lsys.data.tokenizer import Tokenizer
from lsys.generate import generate
from lsys.models import LM
from parallel.mesh import current_mesh, sequence_parallel

VARIANTS = ("passkey", "single", "multikey", "multivalue")
SCORINGS = ("teacher_forced", "generate")
HAYSTACKS = ("stdlib", "filler")

# Generation may run this many tokens past the answer (string match finds the answer anywhere in
# the output), so every prompt leaves room for them.
EXTRA_NEW_TOKENS = 4
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


@dataclass
class NeedleGrid:
    """What to evaluate: `samples` prompts for each context length (tokens) x needle depth (percent)."""

    lengths: list[int]
    depths: list[float]
    samples: int = 4
    variant: str = "passkey"
    scoring: str = "teacher_forced"
    haystack: str = "stdlib"
    seed: int = 0

    def __post_init__(self):
        if not self.lengths or any(length < 1 for length in self.lengths):
            raise EvalError(f"context lengths must be a non-empty list of positive token counts, got {self.lengths}")
        if not self.depths:
            raise EvalError("depths is empty: give needle depths in percent, e.g. [0, 50, 100]")
        for depth in self.depths:
            if not 0 <= depth <= 100:
                raise EvalError(f"needle depth {depth} is outside [0, 100] (percent of the haystack before it)")
        if self.samples < 1:
            raise EvalError(f"samples (prompts per cell) must be at least 1, got {self.samples}")
        for name, value, known in (
            ("variant", self.variant, VARIANTS),
            ("scoring", self.scoring, SCORINGS),
            ("haystack", self.haystack, HAYSTACKS),
        ):
            if value not in known:
                raise EvalError(f"needle {name} {value!r} is unknown; expected one of {', '.join(known)}")


@dataclass(frozen=True)
class NeedlePrompt:
    """One prompt and its answer; positions index `tokens`."""

    tokens: list[int]  # the haystack with the needles in it, then the question
    answer_tokens: list[int]  # what should follow: " " + the values joined by ", "
    values: tuple[str, ...]  # every value the answer names, in order
    needle_start: int  # where the asked needle (multivalue: the first of them) begins
    needle_end: int  # and where it (the last of them) ends
    question_start: int  # where the question begins: the end of the haystack


@dataclass(frozen=True)
class SampleResult:
    """One scored prompt: a row of samples.jsonl."""

    length: int
    depth: float
    sample: int
    variant: str
    scoring: str
    expected: str
    got: str
    correct: bool
    answer_loss: float | None  # teacher_forced only: mean NLL (nats) of the value tokens of the answer


def sample_rng(seed: int, sample: int) -> random.Random:
    """The random draws of sample `sample`: the same key, values and haystack start in every cell of the grid."""
    return random.Random(f"needle-{seed}-{sample}")


def build_prompt(
    tokenizer: Tokenizer, *, variant: str, haystack: str, length: int, depth: float, rng: random.Random
) -> NeedlePrompt:
    """A needle prompt whose tokens plus answer plus EXTRA_NEW_TOKENS fill exactly `length` tokens."""
    asked, distractors, question, values = _needles(variant, rng)
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


def _needles(variant: str, rng: random.Random) -> tuple[list[str], list[str], str, tuple[str, ...]]:
    """(asked needle sentences, distractor sentences, question, values) of one sample."""
    if variant == "passkey":
        value = str(rng.randint(10_000, 99_999))
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


@torch.no_grad()
def teacher_forced_scores(model: LM, prompt: NeedlePrompt) -> tuple[list[int], list[float]]:
    """The model's argmax and the answer token's NLL at each answer position, prompt and earlier answer fed in."""
    tokens = prompt.tokens + prompt.answer_tokens[:-1]
    # Logits at position i predict token i + 1: the first answer token is predicted at the prompt's last position.
    return predictions_at(model, tokens, range(len(prompt.tokens) - 1, len(tokens)), prompt.answer_tokens)


def predictions_at(model: LM, tokens: list[int], positions: range, targets: list[int]) -> tuple[list[int], list[float]]:
    """The most likely next token and the NLL of `targets[i]` at `positions[i]` of one sequence.

    Only those rows reach the vocabulary. Under sequence parallelism every sp rank runs its
    share of the sequence (padded at the end to a length the layout and the mixers can split,
    which causal mixers never look back at), and the ranks holding the wanted positions hand
    their results to the others.
    """
    device = model.embed.weight.device
    wanted = torch.tensor(targets, device=device)
    mesh = sequence_parallel()
    if mesh is None:
        hidden = model.hidden_states(torch.tensor([tokens], device=device))[0, positions.start : positions.stop]
        log_probs = model.logits(hidden).log_softmax(dim=-1)
        nll = -log_probs.gather(-1, wanted[:, None])[:, 0]
        return log_probs.argmax(dim=-1).tolist(), nll.tolist()
    multiple = sequence_parallel_multiple(model.cfg, mesh.layout.unit())
    padded = tokens + [tokens[-1]] * (-len(tokens) % multiple)
    local_positions = mesh.layout.positions(mesh.sp_rank, len(padded), device=device)
    hidden = model.hidden_states(torch.tensor(padded, device=device)[local_positions][None])[0]
    held = (local_positions >= positions.start) & (local_positions < positions.stop)
    rows = local_positions[held] - positions.start
    log_probs = model.logits(hidden[held]).log_softmax(dim=-1)
    # Row 0 the argmax, row 1 the NLL; each position is held by exactly one rank, the others add 0.
    found = torch.zeros(2, len(positions), dtype=torch.float64, device=device)
    found[0, rows] = log_probs.argmax(dim=-1).double()
    found[1, rows] = -log_probs.gather(-1, wanted[rows, None])[:, 0].double()
    dist.all_reduce(found, group=mesh.sp_group)
    return found[0].long().tolist(), found[1].tolist()


def value_token_mask(tokenizer: Tokenizer, answer_tokens: list[int]) -> list[bool]:
    """Which answer tokens spell part of a value: all but tokens of spaces and commas alone."""
    return [tokenizer.decode([token]).strip(" ,") != "" for token in answer_tokens]


def generated_answer(model: LM, prompt: NeedlePrompt, eos_id: int) -> list[int]:
    """Greedy continuation of the prompt: len(answer) + EXTRA_NEW_TOKENS tokens, or fewer up to EOS."""
    return generate(
        model, [prompt.tokens], max_new_tokens=len(prompt.answer_tokens) + EXTRA_NEW_TOKENS, eos_id=eos_id
    )[0]


def score(model: LM, tokenizer: Tokenizer, prompt: NeedlePrompt, scoring: str) -> tuple[str, bool, float | None]:
    """(what the model answered, as text; whether it is right; the answer loss, teacher_forced only) under `scoring`."""
    if scoring == "teacher_forced":
        predicted, nll = teacher_forced_scores(model, prompt)
        values = [loss for loss, is_value in zip(nll, value_token_mask(tokenizer, prompt.answer_tokens)) if is_value]
        return tokenizer.decode(predicted), predicted == prompt.answer_tokens, sum(values) / len(values)
    text = tokenizer.decode(generated_answer(model, prompt, tokenizer.eos_id))
    return text, all(value in text for value in prompt.values), None


def grid_prompt(grid: NeedleGrid, tokenizer: Tokenizer, length: int, depth: float, sample: int) -> NeedlePrompt:
    """The prompt of one grid point: sample `sample`'s needle and haystack at this length and depth."""
    rng = sample_rng(grid.seed, sample)
    return build_prompt(tokenizer, variant=grid.variant, haystack=grid.haystack, length=length, depth=depth, rng=rng)


def check_grid(grid: NeedleGrid, tokenizer: Tokenizer, *, max_seq_len: int) -> None:
    """Raise EvalError when a length exceeds the model's or is too short for a sample's needle, question and answer."""
    too_long = [length for length in grid.lengths if length > max_seq_len]
    if too_long:
        raise EvalError(
            f"context lengths {too_long} exceed the model's max_seq_len ({max_seq_len}); "
            "evaluate at most that many tokens"
        )
    # A sample's needle, question and answer take the same tokens at every length, so building each
    # sample at the shortest length finds a length too short for them before any scoring.
    for sample in range(grid.samples):
        grid_prompt(grid, tokenizer, min(grid.lengths), 0, sample)


def evaluate_needle(
    model: LM, tokenizer: Tokenizer, grid: NeedleGrid, *, progress: bool = True
) -> list[SampleResult]:
    """Score every prompt of the grid (length-major, then depth, then sample); the model's train/eval mode is restored.

    Under torchrun every rank calls this: the dp replicas share the prompts out, each one's sp
    ranks split its sequences, and every rank returns all the results.
    """
    check_grid(grid, tokenizer, max_seq_len=model.cfg.max_seq_len)
    if grid.scoring == "generate" and sequence_parallel() is not None:
        raise EvalError(
            "scoring=generate decodes on one rank; with parallel.sp > 1 use scoring=teacher_forced "
            "(the same prompts, scored on the answer tokens)"
        )
    mesh = current_mesh()
    dp_rank, dp = (mesh.dp_rank, mesh.dp) if mesh is not None else (0, 1)
    jobs = list(itertools.product(grid.lengths, grid.depths, range(grid.samples)))
    mine = jobs[dp_rank::dp]
    main = not dist.is_initialized() or dist.get_rank() == 0
    was_training = model.training
    model.eval()
    results = []
    try:
        bar = tqdm(mine, desc=f"needle {grid.variant}", unit="prompt", disable=not (progress and main))
        for length, depth, sample in bar:
            prompt = grid_prompt(grid, tokenizer, length, depth, sample)  # one at a time: long grids fill memory
            got, correct, answer_loss = score(model, tokenizer, prompt, grid.scoring)
            expected = ", ".join(prompt.values)
            results.append(
                SampleResult(length, depth, sample, grid.variant, grid.scoring, expected, got, correct, answer_loss)
            )
    finally:
        model.train(was_training)
    if dp == 1:
        return results
    # Replica d scored jobs d, d + dp, ...: interleave the replicas' lists back into grid order.
    per_rank: list[list[SampleResult]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(per_rank, results)
    per_replica = per_rank[:: mesh.sp]  # the sp ranks of a replica hold the same results
    return [per_replica[i % dp][i // dp] for i in range(len(jobs))]
