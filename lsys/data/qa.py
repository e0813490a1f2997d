"""Generated long-document question answering: a constant of a standard-library file, asked after a long piece of it.

A fact is a module-level line `NAME = VALUE` of one of the running Python's standard-library `.py`
files (`lsys.data.stdlib.stdlib_files`): at column 0, one name assigned, VALUE an int, float or str literal
of at most MAX_VALUE_CHARS characters on that one line, and NAME written nowhere else in the file
(as a whole word), so a context cut from the file states it once and nothing else in it mentions
it. `ast` decides what is a module-level assignment (a file that does not parse is skipped); a
regular expression first keeps the files that have a candidate line, as parsing every file is slow.

An example is one chat, for `data.format: messages`::

    user:      {context}\\n\\nQuestion: what is {NAME} set to in this file?
    assistant: {VALUE}                  (exactly as written in the source, e.g. 4096 or 'utf-8')

The context is whole consecutive lines of the fact's file around the fact's line, which sits at a
depth drawn uniformly from 0 (the context's first line) to 1 (its last line), measured in bytes;
near either end of the file the context is shifted to stay inside it, so the depth is what the
file allows. The context is as long as fits: the whole example, rendered with the plain template
(`lsys.data.chat`) in byte tokens (one per UTF-8 byte) and its EOS, takes at most seq_len + 1 tokens
(seq_len window positions) less SPARE_TOKENS. A byte-level BPE takes no more tokens than bytes, so
the examples fit its windows too. A fact whose line cannot fit, or whose file is shorter than the
context, is skipped. A draw whose context shows the answer's text anywhere else (small values such
as `0` recur often) is drawn again, fact and depth both, so the answer is stated exactly once.

Split by file, so held-out questions come from files never trained on: a fact is validation when
`lsys.data.splits.in_validation_split` holds for its file's path relative to the standard-library root.
Draws are seeded by a string, so the examples are the same on every machine with the same Python.
"""

import ast
import bisect
import itertools
import logging
import random
import re
import sysconfig
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from lsys.data.chat import PlainTemplate
from lsys.data.errors import DataError
from lsys.data.splits import ROW_COLUMN, MapSplits, in_validation_split
from lsys.data.stdlib import stdlib_files

logger = logging.getLogger(__name__)

QUESTION = "Question: what is {name} set to in this file?"
MAX_VALUE_CHARS = 24
SPARE_TOKENS = 4  # window positions every example leaves free
DRAWS_PER_EXAMPLE = 50  # draws allowed per example before giving up (most draws state their answer once)
# A line that may be a fact: `NAME = ` then a number or a (prefixed) quote, MAX_VALUE_CHARS at most.
_CANDIDATE = re.compile(r"^([^\W\d]\w*) = ((?:[0-9.]|[rRuU]?['\"]).{0,%d})$" % (MAX_VALUE_CHARS - 1), re.MULTILINE)
_LITERAL_TYPES = (int, float, str)  # exact types: True/False (bool) and None are not facts


@dataclass(frozen=True, eq=False)
class SourceFile:
    """A standard-library file as lines, with where each starts and ends in its UTF-8 bytes (newlines between)."""

    path: str  # relative to the standard-library root, '/'-separated: what the validation split hashes
    lines: list[str]
    starts: list[int]
    ends: list[int]

    @classmethod
    def of(cls, path: str, text: str) -> "SourceFile":
        """The file at `path` (relative) whose text is `text`."""
        lines = text.split("\n")
        sizes = [len(line.encode("utf-8")) for line in lines]
        starts = list(itertools.accumulate((size + 1 for size in sizes[:-1]), initial=0))
        return cls(path, lines, starts, [start + size for start, size in zip(starts, sizes)])

    @property
    def size(self) -> int:
        """The file's length in UTF-8 bytes."""
        return self.ends[-1]


@dataclass(frozen=True)
class Fact:
    """One `NAME = VALUE` line of a file: the question's name and its answer."""

    file: SourceFile = field(repr=False)
    line: int  # index into file.lines
    name: str
    value: str  # the literal as written in the source

    @property
    def path(self) -> str:
        """The path of the fact's file, relative to the standard-library root."""
        return self.file.path


@dataclass(frozen=True)
class QAExample:
    """A drawn example: its fact, the lines its context spans (first..last, inclusive) and its chat."""

    fact: Fact
    first: int
    last: int
    messages: list[dict[str, str]]


def file_facts(path: str, text: str) -> list[Fact]:
    """The facts of one file (see the module docstring), in line order; [] if it does not parse."""
    candidates = {match.group(1) for match in _CANDIDATE.finditer(text)}
    if not candidates:
        return []
    # One pass counts every candidate's whole-word uses; the longest name is tried first at each place.
    names = sorted(candidates, key=len, reverse=True)
    uses = Counter(re.findall(r"\b(?:%s)\b" % "|".join(map(re.escape, names)), text))
    once = {name for name in candidates if uses[name] == 1}
    if not once:
        return []
    try:
        with warnings.catch_warnings():  # invalid escapes and the like in old files: not ours to report
            warnings.simplefilter("ignore")
            tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes
        return []
    file = SourceFile.of(path, text)
    facts = []
    for node in tree.body:
        if not (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id in once
            and isinstance(node.value, ast.Constant)
            and type(node.value.value) in _LITERAL_TYPES
            and node.col_offset == 0
        ):
            continue
        name, value = node.targets[0].id, ast.get_source_segment(text, node.value)
        line = node.lineno - 1
        if value is not None and len(value) <= MAX_VALUE_CHARS and file.lines[line] == f"{name} = {value}":
            facts.append(Fact(file, line, name, value))
    return facts


def stdlib_facts() -> tuple[list[Fact], int]:
    """Every fact of the standard library, sorted by file and line, and how many files were searched."""
    root = Path(sysconfig.get_paths()["stdlib"])  # the root `stdlib_files` searches
    files = stdlib_files()
    facts = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        facts += file_facts(file.relative_to(root).as_posix(), text)
    return facts, len(files)


def context_budget(fact: Fact, *, seq_len: int) -> int:
    """The UTF-8 bytes the fact's context may take so that its example fits seq_len with SPARE_TOKENS to spare."""
    return seq_len + 1 - SPARE_TOKENS - _byte_tokens(_messages("", fact))


def draw_examples(facts: list[Fact], *, count: int, seq_len: int, seed: str) -> list[QAExample]:
    """`count` examples drawn (with replacement) over `facts` and depths; the same for the same arguments.

    Facts that cannot fit seq_len (see the module docstring) are left out; raises DataError if none is left,
    or if too many draws show their answer twice.
    """
    budgets = {id(fact): context_budget(fact, seq_len=seq_len) for fact in facts}
    usable = [f for f in facts if f.file.ends[f.line] - f.file.starts[f.line] <= budgets[id(f)] <= f.file.size]
    if not usable:
        raise DataError(f"data.seq_len {seq_len} is too short for stdlib_qa examples: none of {len(facts)} facts fits")
    rng = random.Random(f"stdlib_qa-{seed}")
    examples = []
    for _ in range(count * DRAWS_PER_EXAMPLE):
        fact = usable[rng.randrange(len(usable))]
        first, last = _context_lines(fact, depth=rng.uniform(0.0, 1.0), budget=budgets[id(fact)])
        messages = _messages("\n".join(fact.file.lines[first : last + 1]), fact)
        if messages[0]["content"].count(fact.value) == 1:
            examples.append(QAExample(fact, first, last, messages))
            if len(examples) == count:
                return examples
    raise DataError(
        f"stdlib_qa: only {len(examples)} of {count * DRAWS_PER_EXAMPLE} draws stated their answer once, "
        f"short of {count} examples"
    )


def stdlib_qa_examples(
    *, num_documents: int, val_fraction: float, seq_len: int, name: str, column: str = "messages"
) -> MapSplits:
    """(train, validation) chats in `column`, plus ROW_COLUMN, map-style; validation is None when turned off.

    `num_documents` training examples; validation gets max(1, round(num_documents * val_fraction)) from the
    held-out files, or is None when val_fraction is 0 or no fact falls there.
    """
    if num_documents < 1:
        raise DataError(f"data.num_documents must be positive for source 'stdlib_qa', got {num_documents}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction {val_fraction} must be in [0, 1)")
    facts, num_files = stdlib_facts()
    if not facts:
        raise DataError(f"data set '{name}': none of the {num_files} standard-library files holds a stdlib_qa fact")
    held_out = {fact.path: in_validation_split(fact.path, val_fraction) for fact in facts}
    train_facts = [fact for fact in facts if not held_out[fact.path]]
    val_facts = [fact for fact in facts if held_out[fact.path]]
    if not train_facts:
        raise DataError(f"data set '{name}' has no training facts: all {len(facts)} are in held-out files")
    train = draw_examples(train_facts, count=num_documents, seq_len=seq_len, seed="train")
    val = None
    if val_facts:
        val = draw_examples(val_facts, count=max(1, round(num_documents * val_fraction)), seq_len=seq_len, seed="val")
    elif val_fraction > 0:
        logger.warning("data set '%s': no fact is in a held-out file (val_fraction %s); validation is off",
                       name, val_fraction)
    logger.info(
        "data set '%s': %d stdlib_qa facts in %d of %d standard-library files (%d facts in %d held-out files); "
        "%d training examples, %d validation",
        name, len(facts), len(held_out), num_files, len(val_facts), sum(held_out.values()), len(train),
        len(val or []),
    )
    return _dataset(train, column), (None if val is None else _dataset(val, column))


def _context_lines(fact: Fact, *, depth: float, budget: int) -> tuple[int, int]:
    """The first and last line of the context: the fact's line at `depth` of at most `budget` bytes, in the file."""
    file = fact.file
    start = file.starts[fact.line] - round(depth * (budget - (file.ends[fact.line] - file.starts[fact.line])))
    start = min(max(start, 0), file.size - budget)
    # Whole lines only: those that start at or after `start` and end by `start + budget`.
    return bisect.bisect_left(file.starts, start), bisect.bisect_right(file.ends, start + budget) - 1


def _messages(context: str, fact: Fact) -> list[dict[str, str]]:
    question = QUESTION.format(name=fact.name)
    return [{"role": "user", "content": f"{context}\n\n{question}"}, {"role": "assistant", "content": fact.value}]


def _byte_tokens(messages: list[dict[str, str]]) -> int:
    """Tokens of the chat in the plain template with byte tokens: its UTF-8 bytes, and one for the EOS id."""
    pieces = PlainTemplate(eos_id=-1).pieces(messages)  # the id is never used: only that it is one token
    return sum(len(piece.encode("utf-8")) if isinstance(piece, str) else 1 for piece, _ in pieces)


def _dataset(examples: list[QAExample], column: str) -> datasets.Dataset:
    features = datasets.Features(
        {
            column: datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            ROW_COLUMN: datasets.Value("int64"),
        }
    )
    columns = {column: [example.messages for example in examples], ROW_COLUMN: np.arange(len(examples), dtype=np.int64)}
    return datasets.Dataset.from_dict(columns, features=features)
