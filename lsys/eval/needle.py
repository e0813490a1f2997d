"""Needle retrieval: the grid of context lengths x depths, the prompts scored, and the work shared over ranks.

The prompts (haystack, needles, question and answer, per variant) come from
`lsys.data.needle_prompts`: each fills its context length exactly, with `EXTRA_NEW_TOKENS` of room
for generation, so the model never sees more than `length` tokens, under either scoring, and both
scorings read the same prompts. Sample `s` of a grid draws its key, values and haystack start from
`sample_rng(seed, s)`: the same in every cell.

Scorings:
- `teacher_forced`: prompt and answer go in; correct when the model's argmax at every answer
  position is the answer token (exact match). Also gives the answer loss: the mean negative
  log-likelihood (nats) of the answer tokens that spell the values (a separator token of its
  own, like the leading space, left out), which moves long before exact match does. For a
  5-digit passkey with byte tokens, chance is (ln 9 + 4 ln 10) / 5 = 2.28.
- `generate`: greedy decoding of len(answer) + EXTRA_NEW_TOKENS tokens; correct when every value
  occurs in the decoded text (RULER's string match).
"""

import itertools
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from lsys.config import sequence_parallel_multiple
# EvalError lives with the prompts (build_prompt raises it) and is this module's error too.
from lsys.data.needle_prompts import EXTRA_NEW_TOKENS, HAYSTACKS, VARIANTS, EvalError, NeedlePrompt, build_prompt
from lsys.data.tokenizer import Tokenizer
from lsys.eval.needle_settings import NeedleSettings
from lsys.generate import generate
from lsys.models import LM
from parallel.mesh import current_mesh, sequence_parallel

SCORINGS = ("teacher_forced", "generate")


@dataclass
class NeedleGrid(NeedleSettings):
    """What to evaluate: needle settings (conf/eval/needle.yaml, trainer.needle) whose values are checked."""

    def __post_init__(self):
        if not self.lengths or any(length < 1 for length in self.lengths):
            raise EvalError(f"context lengths must be a non-empty list of positive token counts, got {self.lengths}")
        if not self.depths:
            raise EvalError("depths is empty: give needle depths in percent, e.g. [0, 50, 100]")
        for depth in self.depths:
            if not 0 <= depth <= 100:
                raise EvalError(f"needle depth {depth:g} is outside [0, 100] (percent of the haystack before it)")
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
