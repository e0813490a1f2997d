"""Held-out SFT scores: answer loss (teacher-forced, any dp x sp), and exact match and ROUGE-L of greedy answers.

The held-out examples are the validation split of the data config (`lsys.data.sft`: `data.val_path`,
the hub's `data.val_split`, or the hash split by `data.val_fraction`). The loss is the mean negative
log-likelihood per answer token over all of them, laid out as training lays them (windows, padding
and isolation), so it equals the trainer's `val_loss` on the same split. Generation takes the first
`samples` of them: the prompt is the conversation rendered up to its last assistant turn (the chat
template's generation prompt included), the reference is that turn's content, and the model answers
greedily until EOS or `max_new_tokens`.

- exact match: the answer equals the reference after stripping surrounding whitespace;
- ROUGE-L: the F-measure (beta 1) of the longest common subsequence of the two texts' tokens, where
  a token is a run of word characters or one other non-space character, lower-cased (so `'utf-8'`
  and `"utf-8"` share 3 of their 5 tokens).
"""

import re
from dataclasses import dataclass

import torch
from tqdm import tqdm

from lsys.data.chat import ChatTemplate, Piece
from lsys.data.tokenizer import Tokenizer
from lsys.generate import generate
from lsys.models import LM

_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass
class SftEvalSettings:
    """What launch/eval_sft.py scores (Hydra's schema for conf/eval/sft.yaml)."""

    loss_examples: int | None = 512  # the answer loss over this many held-out examples; null: all of them
    samples: int = 64  # the first N held-out examples are answered greedily (0: the loss only)
    max_new_tokens: int = 32  # an answer stops at EOS or after this many tokens
    batch_size: int = 8  # prompts generated together


@dataclass(frozen=True)
class AnswerResult:
    index: int  # the example's place among those answered (in the held-out split's order)
    reference: str
    prediction: str
    exact_match: bool
    rouge_l: float


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of two texts (module docstring); 0 when either has no token."""
    predicted, wanted = _TOKEN.findall(prediction.lower()), _TOKEN.findall(reference.lower())
    if not predicted or not wanted:
        return 0.0
    # Longest common subsequence, one row of the table at a time.
    previous = [0] * (len(wanted) + 1)
    for token in predicted:
        current = [0]
        for j, other in enumerate(wanted):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def answer_prompt(
    messages: list[dict[str, str]], template: ChatTemplate, tokenizer: Tokenizer
) -> tuple[list[int], str]:
    """(prompt ids, reference answer) of a conversation: its tokens up to its last assistant answer, tokenized
    piece by piece as training does, and that answer's content."""
    pieces = template.pieces(messages)
    end = len(pieces)
    while end > 0 and pieces[end - 1][1]:  # the last answer: the final run of pieces that carry loss
        end -= 1
    reference = next(turn["content"] for turn in reversed(messages) if turn["role"] == "assistant")
    return _encode(pieces[:end], tokenizer), reference


def answer_scores(
    model: LM,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = False,
) -> list[AnswerResult]:
    """Greedy answers to each conversation's last question, scored against its last assistant turn."""
    results = []
    starts = range(0, len(conversations), batch_size)
    for start in tqdm(starts, desc="answering", unit="batch", disable=not progress, dynamic_ncols=True):
        prompts, references = zip(
            *(answer_prompt(messages, template, tokenizer) for messages in conversations[start : start + batch_size])
        )
        with torch.no_grad():
            outputs = generate(model, list(prompts), max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id)
        for offset, (ids, reference) in enumerate(zip(outputs, references)):
            if ids and ids[-1] == tokenizer.eos_id:
                ids = ids[:-1]
            prediction = tokenizer.decode(ids)
            results.append(AnswerResult(
                index=start + offset, reference=reference, prediction=prediction,
                exact_match=exact_match(prediction, reference), rouge_l=rouge_l(prediction, reference),
            ))
    return results


def _encode(pieces: list[Piece], tokenizer: Tokenizer) -> list[int]:
    ids: list[int] = []
    for piece, _ in pieces:
        ids += tokenizer.encode(piece) if isinstance(piece, str) else [piece]
    return ids
