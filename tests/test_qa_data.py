"""Tests of the generated question-answering set (lsys.data.qa): facts, contexts, depths, split, fit in windows."""

import ast
import re
import sysconfig
from pathlib import Path

import pytest

from lsys.data import ByteTokenizer, DataError, build_loaders, load_examples, qa
from lsys.data.config import DataConfig
from lsys.data.splits import ROW_COLUMN, in_validation_split

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EOS = ByteTokenizer.eos_id
LAYOUT = {"micro_batch_size": 1, "dp_rank": 0, "dp_size": 1, "seed": 0}
QUESTION = re.compile(r"\n\nQuestion: what is (\w+) set to in this file\?\Z")


@pytest.fixture(scope="module")
def facts() -> list[qa.Fact]:
    # Searching the standard library takes seconds: once for the module.
    found, _ = qa.stdlib_facts()
    return found


@pytest.fixture(scope="module")
def examples(facts) -> list[qa.QAExample]:
    return qa.draw_examples(facts, count=400, seq_len=512, seed="test")


@pytest.fixture
def known_facts(monkeypatch, facts):
    """The pipeline (load_examples, build_loaders) over the facts already found, not a second search."""
    monkeypatch.setattr(qa, "stdlib_facts", lambda: (facts, len({f.path for f in facts})))
    return facts


def real_lines(path: str) -> list[str]:
    return (STDLIB / path).read_text(encoding="utf-8").split("\n")


def whole_word_count(name: str, text: str) -> int:
    return len(re.findall(rf"\b{re.escape(name)}\b", text))


def qa_cfg(**overrides) -> dict:
    return {
        "name": "qa", "source": "stdlib_qa", "format": "messages", "num_documents": 30, "val_fraction": 0.05,
        "doc_isolation": True, **overrides,
    }


def test_facts_are_module_constants_named_once_in_their_file(facts):
    assert len(facts) >= 50 and len({f.path for f in facts}) >= 10
    for fact in facts:
        text = (STDLIB / fact.path).read_text(encoding="utf-8")
        assert text.split("\n")[fact.line] == f"{fact.name} = {fact.value}"
        assert len(fact.value) <= qa.MAX_VALUE_CHARS
        assert type(ast.literal_eval(fact.value)) in (int, float, str)
        assert whole_word_count(fact.name, text) == 1
    assert facts == sorted(facts, key=lambda f: (f.path, f.line))


def test_file_facts_skips_strings_nested_code_and_repeated_names():
    text = (
        'DOC = """\nINSIDE = 1\n"""\n'  # in a string: not code
        "if True:\n    NESTED = 2\n"  # not at column 0
        "USED = 3\nprint(USED)\n"  # named twice
        "FLAG = True\nNOTHING = None\nNEG = -1\nSPACED=4\n"  # not int/float/str literals, or not `NAME = VALUE`
        "LONG = 'abcdefghijklmnopqrstuvwxyz'\n"  # over MAX_VALUE_CHARS
        "BUFSIZE = 4096\nENCODING = 'utf-8'\nRATIO = 0.5\n"
    )
    assert [(f.name, f.value, f.line) for f in qa.file_facts("x.py", text)] == [
        ("BUFSIZE", "4096", 12), ("ENCODING", "'utf-8'", 13), ("RATIO", "0.5", 14),
    ]
    assert qa.file_facts("bad.py", "X = 1\ndef (:\n") == []  # does not parse


def test_every_example_states_its_answer_once_in_real_consecutive_lines(examples):
    for example in examples:
        fact, (user, assistant) = example.fact, example.messages
        assert user["role"] == "user" and assistant == {"role": "assistant", "content": fact.value}
        question = QUESTION.search(user["content"])
        assert question is not None and question.group(1) == fact.name
        context = user["content"][: question.start()]
        assert user["content"].count(fact.value) == 1
        assert whole_word_count(fact.name, context) == 1
        assert example.first <= fact.line <= example.last
        assert context == "\n".join(real_lines(fact.path)[example.first : example.last + 1])


def test_depths_cover_the_whole_context(examples):
    depths = []  # of the fact's line: the share of the context's other bytes that come before it
    for example in examples:
        file, line = example.fact.file, example.fact.line
        others = file.ends[example.last] - file.starts[example.first] - (file.ends[line] - file.starts[line])
        depths.append((file.starts[line] - file.starts[example.first]) / max(1, others))
    assert min(depths) == 0.0 and max(depths) > 0.97  # the fact as the first line, and near or at the last
    assert sum(d < 0.1 for d in depths) > 20 and sum(d > 0.9 for d in depths) > 20
    assert all(sum(k / 5 <= d < (k + 1) / 5 for d in depths) > 40 for k in range(5))  # 80 expected per fifth
    assert any(example.fact.line == example.last for example in examples)


def test_the_same_seed_gives_the_same_examples(facts, examples):
    again = qa.draw_examples(facts, count=400, seq_len=512, seed="test")
    assert [e.messages for e in again] == [e.messages for e in examples]
    other = qa.draw_examples(facts, count=400, seq_len=512, seed="other")
    assert [e.messages for e in other] != [e.messages for e in examples]


def test_the_split_is_by_file(known_facts):
    cfg = DataConfig.from_attrs(qa_cfg(num_documents=300, val_fraction=0.2))
    train, val = load_examples(cfg, seq_len=512)
    assert (len(train), len(val)) == (300, 60)
    assert train[ROW_COLUMN] == list(range(300)) and val[ROW_COLUMN] == list(range(60))
    texts = {f.path: "\n".join(f.file.lines) for f in known_facts}

    def files_of(split) -> set[str]:
        files = set()
        for messages in split["messages"]:
            context = messages[0]["content"][: QUESTION.search(messages[0]["content"]).start()]
            (path,) = {f.path for f in known_facts if f.value == messages[1]["content"] and context in texts[f.path]}
            files.add(path)
        return files

    train_files, val_files = files_of(train), files_of(val)
    assert train_files and val_files and not train_files & val_files
    assert all(in_validation_split(path, 0.2) for path in val_files)
    assert not any(in_validation_split(path, 0.2) for path in train_files)
    again, _ = load_examples(cfg, seq_len=512)
    assert again["messages"] == train["messages"]


def test_examples_fill_byte_windows_through_the_loaders(known_facts):
    tokenizer = ByteTokenizer()
    cfg = qa_cfg()
    expected, _ = load_examples(DataConfig.from_attrs(cfg), seq_len=256)
    train, val = build_loaders(cfg, seq_len=256, tokenizer=tokenizer, **LAYOUT)
    assert val is not None and val.num_batches == 2  # max(1, round(30 * 0.05))
    answers, used = [], []
    for _ in range(train.batches_per_epoch):
        inputs, targets, segments = next(train)
        loss = targets[0] != -100
        answer = targets[0][loss].tolist()
        assert answer[-1] == EOS and EOS not in answer[:-1]
        answers.append(tokenizer.decode(answer[:-1]))
        # One example per window (the next would not fit), its answer right after the assistant prompt.
        text = tokenizer.decode(inputs[0][segments[0] == 0].tolist())
        assert text.startswith("<|user|>\n") and text.endswith(f"\n<|assistant|>\n{answers[-1]}")
        used.append(int((segments[0] == 0).sum()))
    assert sorted(answers) == sorted(messages[1]["content"] for messages in expected["messages"])
    assert max(used) <= 256 - qa.SPARE_TOKENS and min(used) > 256 // 2


def test_bad_settings_are_named(known_facts):
    with pytest.raises(DataError, match=r"data.num_documents must be positive for source 'stdlib_qa', got 0"):
        load_examples(DataConfig.from_attrs(qa_cfg(num_documents=0)), seq_len=256)
    with pytest.raises(DataError, match=r"data.val_fraction 1.0 must be in \[0, 1\)"):
        load_examples(DataConfig.from_attrs(qa_cfg(val_fraction=1.0)), seq_len=256)
    with pytest.raises(DataError, match=r"data.seq_len 64 is too short for stdlib_qa examples"):
        load_examples(DataConfig.from_attrs(qa_cfg()), seq_len=64)
    with pytest.raises(DataError, match=r"data.source 'stdlib_qa' generates chats: set data.format=messages"):
        load_examples(DataConfig.from_attrs(qa_cfg(format="prompt_response")), seq_len=256)
    train, val = load_examples(DataConfig.from_attrs(qa_cfg(val_fraction=0.0)), seq_len=256)
    assert len(train) == 30 and val is None
