"""Tests of SFT data (lsys.data.sft, lsys.data.chat): loss masks, packed windows, truncation, bad data, loaders."""

import json
import logging
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lsys.data import ByteTokenizer, DataConfig, DataError, HFTokenizer, build_loaders
from lsys.data.sft import example_windows
from lsys.data.sources import example_key
from lsys.data.splits import ROW_COLUMN, in_validation_split
from tests.conftest import compose_config

EOS = ByteTokenizer.eos_id
HF_EOS = "<|endoftext|>"
LAYOUT = {"micro_batch_size": 1, "dp_rank": 0, "dp_size": 1, "seed": 0}

CHATS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green, then red."},
        {"role": "user", "content": "Thanks"},  # after the last answer: left out
    ],
    [{"role": "system", "content": "You count."}, {"role": "user", "content": "Count to three"},
     {"role": "assistant", "content": "one two three"}],
]
PAIRS = [
    {"prompt": "Translate 'chat' to English.", "response": "cat"},
    {"prompt": "Say hello", "response": "Hello, world!"},
    {"prompt": "Spell dog", "response": "d o g"},
]
# The answers of each example, in order: what must carry loss (each followed by EOS).
CHAT_ANSWERS = [[t["content"] for t in chat if t["role"] == "assistant"] for chat in CHATS]
PAIR_ANSWERS = [[pair["response"]] for pair in PAIRS]

# Two Jinja templates in the HF chat-template language; each renders every turn on its own.
TAGGED_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}"
    "{{ eos_token }}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}\n"
)
HEADED_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}### {{ m['role'] }}:{{ '\\n' }}"
    "{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}### assistant:{{ '\\n' }}{% endif %}"
)


@pytest.fixture(scope="session", autouse=True)
def isolated_datasets_cache(tmp_path_factory):
    """Keeps the test data (new tmp paths every run) out of the user's datasets cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


@pytest.fixture(scope="session")
def bpe_file(tmp_path_factory) -> Path:
    """A tiny byte-level BPE trained on the examples, with EOS as its one special token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[HF_EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [t["content"] for chat in CHATS for t in chat] + [v for pair in PAIRS for v in pair.values()]
    bpe.train_from_iterator(texts * 20, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    bpe.save(str(path))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sft_cfg(path, **overrides) -> dict:
    return {
        "name": "sft", "source": "files", "path": str(path), "format": "messages", "doc_isolation": True,
        "val_fraction": 0.0, **overrides,
    }


def examples_of(batches) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every example of the batches as (inputs, targets), cut out by segment_ids; padding left out."""
    examples = []
    for inputs, targets, segments in batches:
        for row_inputs, row_targets, row_segments in zip(inputs.tolist(), targets.tolist(), segments.tolist()):
            for segment in sorted(set(row_segments)):
                at = [j for j, s in enumerate(row_segments) if s == segment]
                pair = (tuple(row_inputs[j] for j in at), tuple(row_targets[j] for j in at))
                if not all(t == -100 for t in pair[1]):
                    examples.append(pair)
    return examples


def answer_runs(targets: tuple[int, ...]) -> list[list[int]]:
    """The runs of consecutive targets that carry loss."""
    runs, run = [], []
    for target in targets + (-100,):
        if target != -100:
            run.append(target)
        elif run:
            runs.append(run)
            run = []
    return runs


def all_batches(loader) -> list:
    return [next(loader) for _ in range(loader.batches_per_epoch)]


# --- the loss mask, token by token ------------------------------------------------------------


@pytest.mark.parametrize("setup", ["byte", "hf", "hf+chat_template", "hf+tokenizer_config"])
@pytest.mark.parametrize("form", ["messages", "prompt_response"])
def test_exactly_the_answers_and_their_end_tokens_carry_loss(tmp_path, bpe_file, setup, form):
    if form == "messages":
        path, expected = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS]), CHAT_ANSWERS
    else:
        path, expected = write_jsonl(tmp_path / "pairs.jsonl", PAIRS), PAIR_ANSWERS
    cfg = sft_cfg(path, format=form)
    tokenizer = ByteTokenizer()
    if setup != "byte":
        folder = tmp_path / "tokenizer"
        folder.mkdir()
        shutil.copy(bpe_file, folder / "tokenizer.json")
        cfg["tokenizer"] = {"kind": "hf", "path": str(folder / "tokenizer.json"), "eos_token": HF_EOS}
        tokenizer = HFTokenizer(folder / "tokenizer.json", HF_EOS)
    if setup == "hf+chat_template":
        (tmp_path / "tagged.jinja").write_text(TAGGED_TEMPLATE, encoding="utf-8")
        cfg["chat_template"] = str(tmp_path / "tagged.jinja")
    if setup == "hf+tokenizer_config":
        config = {"chat_template": HEADED_TEMPLATE, "eos_token": HF_EOS, "bos_token": None}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")

    train, val = build_loaders(cfg, seq_len=160, tokenizer=tokenizer, **LAYOUT)
    assert val is None
    # Which template rendered the examples: (text every example shows, text none shows).
    marks = {"hf+chat_template": ("<|user|>", "|>\n"), "hf+tokenizer_config": ("### user:\n", "<|")}
    present, absent = marks.get(setup, ("<|user|>\n", "###"))
    got = []
    for inputs, targets in examples_of(all_batches(train)):
        text = tokenizer.decode(inputs)
        assert present in text and absent not in text
        runs = answer_runs(targets)
        assert all(run[-1] == tokenizer.eos_id and tokenizer.eos_id not in run[:-1] for run in runs)
        got.append([tokenizer.decode(run[:-1]) for run in runs])
        # Inputs and targets are the example shifted by one wherever a target carries loss.
        assert all(t == -100 or t == i for i, t in zip(inputs[1:], targets[:-1]))
    assert sorted(got) == sorted(expected)


def test_plain_template_text_with_byte_tokens(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHATS[0]}])
    train, _ = build_loaders(sft_cfg(path, packing=False, doc_isolation=False), seq_len=160, tokenizer=ByteTokenizer(),
                             **LAYOUT)
    inputs, targets, segments = next(train)
    first = b"<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\nHello! How can I help?"
    second = b"<|user|>\nWhat is the capital of France?\n<|assistant|>\nParis."
    example = [*first, EOS, *second, EOS]
    n = len(example) - 1
    assert inputs[0, :n].tolist() == example[:-1] and (inputs[0, n:] == EOS).all()
    assert segments[0].tolist() == [0] * n + [1] * (160 - n)  # the padding has an id of its own
    loss = (targets[0] != -100).nonzero().flatten().tolist()
    assert bytes(t for t in targets[0, loss].tolist() if t != EOS) == b"Hello! How can I help?Paris."
    assert (targets[0, n:] == -100).all()


def test_a_template_that_is_not_incremental_is_named(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS])
    template = tmp_path / "counted.jinja"
    template.write_text("{{ messages | length }} turns{% for m in messages %} {{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match=r"example 0: chat template '.*counted.jinja' is not incremental"):
        build_loaders(sft_cfg(path, chat_template=str(template)), seq_len=160, tokenizer=ByteTokenizer(), **LAYOUT)
    template.write_text(TAGGED_TEMPLATE)  # writes eos_token, which the byte tokenizer has no text for
    with pytest.raises(DataError, match=r"writes eos_token, but the tokenizer has no EOS text"):
        build_loaders(sft_cfg(path, chat_template=str(template)), seq_len=160, tokenizer=ByteTokenizer(), **LAYOUT)


# --- windows ----------------------------------------------------------------------------------


def tokenized(examples: list[tuple[list[int], list[bool]]], rows: list[int] | None = None) -> datasets.Dataset:
    """Examples as `tokenize_examples` gives them: ids, answer flags and row."""
    rows = list(range(len(examples))) if rows is None else rows
    columns = {"ids": [e[0] for e in examples], "answer": [e[1] for e in examples], ROW_COLUMN: rows}
    features = datasets.Features(
        {"ids": datasets.List(datasets.Value("int32")), "answer": datasets.List(datasets.Value("bool")),
         ROW_COLUMN: datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict(columns, features=features)


def example(first: int, n: int, answer_from: int) -> tuple[list[int], list[bool]]:
    return list(range(first, first + n)), [j >= answer_from for j in range(n)]


def test_greedy_packing_layout():
    # Examples of 4, 5, 3, 9 and 2 tokens take 3, 4, 2, 8 and 1 positions of windows of 8.
    data = tokenized([example(10, 4, 2), example(20, 5, 1), example(30, 3, 2), example(40, 9, 5), example(60, 2, 1)])
    windows = example_windows(data, seq_len=8, packing=True, truncation="error", pad_id=EOS, where="test")
    inputs, targets, segments = windows.batch(torch.arange(windows.count))
    P, I = EOS, -100
    assert inputs.tolist() == [
        [10, 11, 12, 20, 21, 22, 23, P],
        [30, 31, P, P, P, P, P, P],
        [40, 41, 42, 43, 44, 45, 46, 47],
        [60, P, P, P, P, P, P, P],
    ]
    assert targets.tolist() == [
        [I, 12, 13, 21, 22, 23, 24, I],
        [I, 32, I, I, I, I, I, I],
        [I, I, I, I, 45, 46, 47, 48],
        [61, I, I, I, I, I, I, I],
    ]
    assert segments.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 1, 1, 1, 1, 1, 1], [0] * 8, [0, 1, 1, 1, 1, 1, 1, 1]]
    assert windows.inputs.dtype == torch.int32 and inputs.dtype == targets.dtype == segments.dtype == torch.int64

    unpacked = example_windows(data, seq_len=8, packing=False, truncation="error", pad_id=EOS, where="test")
    assert unpacked.count == 5
    rows = unpacked.batch(torch.arange(5))
    assert examples_of([rows]) == examples_of([(inputs, targets, segments)])


def test_packed_and_unpacked_windows_hold_the_same_examples(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS * 3])
    packed, _ = build_loaders(sft_cfg(path), seq_len=256, tokenizer=ByteTokenizer(), **LAYOUT)
    unpacked, _ = build_loaders(sft_cfg(path, packing=False), seq_len=256, tokenizer=ByteTokenizer(), **LAYOUT)
    assert unpacked.batches_per_epoch == 12 and packed.batches_per_epoch < 12
    packed_batches = all_batches(packed)
    assert sorted(examples_of(packed_batches)) == sorted(examples_of(all_batches(unpacked)))
    assert max(int(segments.max()) for _, _, segments in packed_batches) >= 2  # windows hold several examples
    for inputs, targets in examples_of(packed_batches):
        # Every target is the next input of its own example; the last is the example's closing EOS,
        # never the first token of the example after it.
        assert all(t in (-100, i) for i, t in zip(inputs[1:], targets)) and targets[-1] == EOS
    for inputs, targets, segments in packed_batches:
        inputs, targets, segments = inputs[0], targets[0], segments[0]
        steps = segments.diff()
        assert segments[0] == 0 and bool(((steps == 0) | (steps == 1)).all())
        last = segments == segments.max()
        if (inputs[last] == EOS).all():  # padding: input EOS, no loss, an id of its own
            assert (targets[last] == -100).all() and targets[~last][-1] == EOS


@pytest.mark.parametrize("truncation", ["error", "left", "skip"])
def test_truncation(truncation, caplog):
    answers_first = (list(range(40, 52)), [1 <= j <= 3 for j in range(12)])  # all in the part cut off by 'left'
    data = tokenized([example(10, 5, 1), example(20, 12, 9), answers_first, example(60, 4, 1)], rows=[3, 8, 9, 11])
    build = lambda: example_windows(data, seq_len=6, packing=False, truncation=truncation, pad_id=EOS,  # noqa: E731
                                    where="data set 'x' (train)")
    if truncation == "error":
        message = r"'x' \(train\) example 8 has 12 tokens, 11 window positions, more than data.seq_len 6; .*left.*skip"
        with pytest.raises(DataError, match=message):
            build()
        return
    with caplog.at_level(logging.INFO, logger="lsys.data.sft"):
        windows = build()
    inputs, targets, _ = windows.batch(torch.arange(windows.count))
    if truncation == "left":
        # Row 8 keeps its last 7 tokens (answers at 29..31); row 9's answers were all in the part cut off.
        assert inputs[:, 0].tolist() == [10, 25, 60]
        assert targets[1].tolist() == [-100, -100, -100, 29, 30, 31]
        summary, kept = "1 example(s) cut from the left to 6 positions, 1 skipped", 3
    else:
        assert inputs[:, 0].tolist() == [10, 60]
        summary, kept = "0 example(s) cut from the left to 6 positions, 2 skipped", 2
    (record,) = [r for r in caplog.records if "cut from the left" in r.getMessage()]
    assert summary in record.getMessage() and record.levelno == logging.WARNING  # something was skipped
    assert f"{kept} examples in {kept} windows of 6" in caplog.text


# --- bad data ---------------------------------------------------------------------------------

GOOD_CHAT = {"messages": CHATS[1]}


@pytest.mark.parametrize(
    ("form", "bad", "message"),
    [
        ("messages", {"other": 1}, r"field 'messages' is missing"),
        ("messages", {"messages": "hello"}, r"field 'messages' must be a list of \{role, content\} turns, got str"),
        ("messages", {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
         r"field 'messages' turn 0: 'content' must be a string, got int"),
        ("messages", {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
         r"field 'messages' turn 0 has no 'role'"),
        ("messages", {"messages": [{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "x"}]},
         r"field 'messages' turn 0: role 'tool' is unknown; expected 'system', 'user' or 'assistant'"),
        ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}]},
         r"field 'messages' turn 1: the assistant's answer is empty"),
        ("messages", {"messages": [{"role": "user", "content": "hi"}]}, r"field 'messages' has no assistant turn"),
        ("prompt_response", {"prompt": "hi"}, r"field 'response' is missing"),
        ("prompt_response", {"prompt": 3, "response": "x"}, r"field 'prompt' must be a string, got int"),
        ("prompt_response", {"prompt": "hi", "response": "  "}, r"field 'response' is empty"),
    ],
)
def test_bad_examples_are_named(tmp_path, form, bad, message):
    good = GOOD_CHAT if form == "messages" else PAIRS[0]
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, bad, good])
    with pytest.raises(DataError, match=r"^data set 'sft' \(train\) example 2: " + message) as error:
        build_loaders(sft_cfg(path, format=form), seq_len=160, tokenizer=ByteTokenizer(), **LAYOUT)
    assert "\n" not in str(error.value)


def test_missing_column_and_text_files(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", PAIRS)
    with pytest.raises(DataError, match=r"data.messages_field 'messages' is not a column .*columns: prompt, response"):
        build_loaders(sft_cfg(path), seq_len=160, tokenizer=ByteTokenizer(), **LAYOUT)
    (tmp_path / "notes.txt").write_text("not records")
    with pytest.raises(DataError, match=r"'sft': SFT examples are read from .jsonl/.json/.parquet records.*notes.txt"):
        build_loaders(sft_cfg(tmp_path, format="prompt_response"), seq_len=160, tokenizer=ByteTokenizer(), **LAYOUT)


def test_the_row_named_is_the_row_read_before_the_validation_split(tmp_path):
    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(12)]
    rows[7]["response"] = ""
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    held_out = in_validation_split(example_key(rows[7]), 0.4)
    split = "validation" if held_out else "train"
    with pytest.raises(DataError, match=rf"\({split}\) example 7: field 'response' is empty"):
        build_loaders(sft_cfg(path, format="prompt_response", val_fraction=0.4), seq_len=64, tokenizer=ByteTokenizer(),
                      **LAYOUT)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"format": "chat"}, r"data.format 'chat' is unknown; expected 'text', 'messages' or 'prompt_response'"),
        ({"truncation": "right"}, r"data.truncation 'right' is unknown; expected 'error', 'left' or 'skip'"),
        ({"packing": "yes"}, r"data.packing must be true or false, got 'yes'"),
        ({"format": "messages"}, r"data.packing=true .* set data.doc_isolation=true, or data.packing=false"),
    ],
)
def test_config_errors(settings, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**settings)


def test_sft_data_config_entry():
    data = compose_config(["data=sft", "data.path=chats.jsonl"]).data
    cfg = DataConfig.from_attrs(data)
    assert (cfg.name, cfg.source, cfg.path, cfg.format) == ("sft", "files", "chats.jsonl", "messages")
    assert cfg.doc_isolation and cfg.packing and cfg.truncation == "error" and cfg.chat_template is None
    assert {f: data[f] for f in ("messages_field", "prompt_field", "response_field")} == {
        "messages_field": "messages", "prompt_field": "prompt", "response_field": "response"
    }


# --- loaders ----------------------------------------------------------------------------------


@pytest.fixture
def many_chats(tmp_path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"},
                          {"role": "assistant", "content": "yes " * (i % 7 + 1)}]} for i in range(60)]
    return write_jsonl(tmp_path / "many.jsonl", rows)


def test_dp_ranks_take_disjoint_windows_and_resume_exactly(many_chats):
    cfg = sft_cfg(many_chats, val_fraction=0.2)
    ranks = [
        build_loaders(cfg, seq_len=64, micro_batch_size=2, dp_rank=r, dp_size=2, seed=3, tokenizer=ByteTokenizer())
        for r in range(2)
    ]
    (train0, val0), (train1, val1) = ranks
    assert train0.batches_per_epoch == train1.batches_per_epoch >= 3
    seen = set()
    for _ in range(train0.batches_per_epoch):
        rows0, rows1 = ({tuple(row) for row in next(loader)[0].tolist()} for loader in (train0, train1))
        assert len(rows0) == len(rows1) == 2 and not rows0 & rows1 and not (rows0 | rows1) & seen
        seen |= rows0 | rows1
    assert train0.state_dict() == train1.state_dict()
    val_rows = [{tuple(row) for batch in val.batches(10) for row in batch[0].tolist()} for val in (val0, val1)]
    assert val_rows[0] and not val_rows[0] & val_rows[1] and not (val_rows[0] | val_rows[1]) & seen

    train = build_loaders(cfg, seq_len=64, tokenizer=ByteTokenizer(), **{**LAYOUT, "micro_batch_size": 2})[0]
    for _ in range(train.batches_per_epoch - 1):
        next(train)
    state = json.loads(json.dumps(train.state_dict()))
    expected = [next(train) for _ in range(4)]  # across the epoch boundary
    resumed = build_loaders(cfg, seq_len=64, tokenizer=ByteTokenizer(), **{**LAYOUT, "micro_batch_size": 2})[0]
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_hub_source_reads_a_map_style_split(tmp_path):
    write_jsonl(tmp_path / "hub" / "data" / "train-00000-of-00001.jsonl", PAIRS * 4)
    write_jsonl(tmp_path / "hub" / "data" / "validation-00000-of-00001.jsonl", PAIRS[:2])
    cfg = sft_cfg(tmp_path / "hub", source="hub", format="prompt_response", val_split="validation", packing=False)
    train, val = build_loaders(cfg, seq_len=64, tokenizer=ByteTokenizer(), **LAYOUT)
    assert train.batches_per_epoch == 12 and val.num_batches == 2
    answers = sorted(bytes(t for t in targets[0].tolist() if t not in (-100, EOS)).decode()
                     for _, targets, _ in val.batches(2))
    assert answers == sorted(p["response"] for p in PAIRS[:2])
    assert all(len(batch) == 3 for batch in val.batches(2))
