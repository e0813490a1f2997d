"""Needle retrieval: the needle sits where the depth says, prompts fill the context exactly, random models
score near zero while a perfect reader scores 1.0, bad input fails clearly, and the CLI writes its report."""

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from omegaconf import OmegaConf

from lsys.data import DataError, build_loaders
from lsys.data.needle_prompts import EXTRA_NEW_TOKENS, VARIANTS, build_prompt
from lsys.data.passkey import passkey_documents
from lsys.data.tokenizer import ByteTokenizer, HFTokenizer
from lsys.eval import EvalError, NeedleGrid, evaluate_needle
from lsys.eval.needle import sample_rng, value_token_mask
from lsys.models import ModelConfig, build_model
from tests.conftest import REPO, TINY, run_train

BYTES = ByteTokenizer()
# Any needle sentence of any variant, shaped as a unit of each haystack: " sentence." or "sentence.\n".
SENTENCE = (
    rb"(?:The pass key is \d+\. Remember it\. \d+ is the pass key\."
    rb"|One of the special magic numbers for [a-z]+-[a-z]+ is: \d+\.)"
)
NEEDLE = {"filler": re.compile(rb" " + SENTENCE), "stdlib": re.compile(SENTENCE + rb"\n")}
UNIT_END = {"filler": b".", "stdlib": b"\n"}


def read_prompt(tokens: list[int], values: tuple[str, ...], haystack: str) -> dict:
    """Where things are in a byte-level prompt, found from its text alone (byte i is token i)."""
    data = bytes(tokens)
    question = data.rindex(b"\nWhat ")
    needles = list(NEEDLE[haystack].finditer(data, 0, question))
    asked = [m for m in needles if any(value.encode() in m.group() for value in values)]
    before = sum(len(m.group()) for m in needles if m.start() < asked[0].start())
    return {
        "asked_start": asked[0].start(),
        "asked_end": asked[-1].end(),
        "question": question,
        "haystack": NEEDLE[haystack].sub(b"", data[:question]),  # the haystack without any needle
        "haystack_before": asked[0].start() - before,  # haystack tokens before the asked needle
    }


@pytest.mark.parametrize("haystack", ["filler", "stdlib"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_needle_sits_at_its_depth_and_the_prompt_fills_the_context(variant: str, haystack: str):
    length = 600
    for sample in range(3):
        for depth in (0, 50, 100):
            prompt = build_prompt(
                BYTES, variant=variant, haystack=haystack, length=length, depth=depth, rng=sample_rng(7, sample)
            )
            # Prompt, answer and the generation room fill the context exactly: never more.
            assert len(prompt.tokens) + len(prompt.answer_tokens) + EXTRA_NEW_TOKENS == length
            assert BYTES.decode(prompt.answer_tokens) == " " + ", ".join(prompt.values)
            found = read_prompt(prompt.tokens, prompt.values, haystack)
            assert (found["asked_start"], found["asked_end"]) == (prompt.needle_start, prompt.needle_end)
            assert found["question"] == prompt.question_start
            if variant == "multivalue":  # all values, one needle after another, in answer order
                block = bytes(prompt.tokens[prompt.needle_start : prompt.needle_end])
                assert [m.group(1).decode() for m in re.finditer(rb"is: (\d+)\.", block)] == list(prompt.values)
            hay, before = found["haystack"], found["haystack_before"]
            if depth == 0:
                assert found["asked_start"] == 0
            elif depth == 100:
                assert before == len(hay) and found["asked_end"] == found["question"]
            else:  # at a unit boundary, with at most one unit end between it and the middle of the haystack
                assert hay[:before].endswith(UNIT_END[haystack])
                middle = len(hay) // 2
                assert hay[min(before, middle) : max(before, middle)].count(UNIT_END[haystack]) <= 1


def test_prompts_are_reproducible_and_differ_between_samples():
    def prompt(seed: int, sample: int):
        rng = sample_rng(seed, sample)
        return build_prompt(BYTES, variant="multikey", haystack="stdlib", length=400, depth=30, rng=rng)

    assert prompt(0, 1) == prompt(0, 1)
    assert prompt(0, 1).tokens != prompt(0, 2).tokens and prompt(0, 1).tokens != prompt(1, 1).tokens


def test_the_needle_stays_whole_with_a_bpe_tokenizer(tmp_path: Path, corpus: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.decoder = decoders.ByteLevel()
    bpe.train([str(p) for p in corpus.iterdir()], trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"]))
    bpe.save(str(tmp_path / "tokenizer.json"))
    tokenizer = HFTokenizer(tmp_path / "tokenizer.json", "</s>")
    for variant in VARIANTS:
        for depth in (0, 50, 100):
            rng = sample_rng(0, 0)
            prompt = build_prompt(tokenizer, variant=variant, haystack="stdlib", length=500, depth=depth, rng=rng)
            assert len(prompt.tokens) + len(prompt.answer_tokens) + EXTRA_NEW_TOKENS == 500
            needle_text = tokenizer.decode(prompt.tokens[prompt.needle_start : prompt.needle_end])
            assert all(f"{value}." in needle_text for value in prompt.values)
            # A tokenizer that puts a space before every text it encodes puts one before the question too.
            assert tokenizer.decode(prompt.tokens[prompt.question_start :]).lstrip(" ").startswith("\nWhat ")
            if depth == 0:
                assert prompt.needle_start == 0
            else:  # right after a line end: the boundary was found on the BPE tokens
                assert "\n" in tokenizer.decode(prompt.tokens[prompt.needle_start - 1 : prompt.needle_start])
            if depth == 100:
                assert prompt.needle_end == prompt.question_start


class History:
    """A stand-in for one layer's decoding cache: the tokens each row has seen."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def row(self, index: int) -> "History":
        return History([self.rows[index]])  # shares the row's list, as a real cache row shares memory


# "What ...? The ... is" (or "are"): the question, up to where the answer starts.
QUESTION = re.compile(r"\nWhat [^?\n]*\? The [^\n]*? (?:is|are)")


def oracle_next_byte(seen: list[int]) -> int:
    """A perfect reader: after the question, the next byte of the answer that the needles in the text give."""
    text = bytes(seen).decode("utf-8", errors="replace")
    start = text.rfind("\nWhat ")
    question = QUESTION.match(text, start) if start >= 0 else None
    if question is None:  # not past the question yet: any prediction will do
        return 0
    key = re.search(r" for (\S+)\?", question.group())
    pattern = rf"numbers for {re.escape(key.group(1))} is: (\d+)\." if key else r"The pass key is (\d+)\."
    answer = " " + ", ".join(re.findall(pattern, text[:start]))
    written = text[question.end() :]
    return ord(answer[len(written)]) if answer.startswith(written) and len(written) < len(answer) else BYTES.eos_id


class OracleLM(torch.nn.Module):
    """An LM-shaped perfect reader: its logits put everything on `oracle_next_byte` of each prefix."""

    def __init__(self):
        super().__init__()
        self.cfg = ModelConfig(name="oracle", vocab_size=BYTES.vocab_size, max_seq_len=1024)
        self.embed = torch.nn.Embedding(BYTES.vocab_size, 1)  # generate reads the device from it

    def forward(self, tokens: torch.Tensor, caches: list[History] | None = None, mode: str = "train") -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, BYTES.vocab_size)
        for row in range(tokens.shape[0]):
            seen = caches[0].rows[row] if caches is not None else []
            for t, token in enumerate(tokens[row].tolist()):
                seen.append(token)
                logits[row, t, oracle_next_byte(seen)] = 1.0
        return logits

    def hidden_states(self, tokens: torch.Tensor, caches=None, mode: str = "train") -> torch.Tensor:
        return self(tokens, caches, mode)  # its "states" are already its logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def init_caches(self, batch_size: int, max_len: int) -> list[History]:
        return [History([[] for _ in range(batch_size)])]

    def prefill(self, tokens: torch.Tensor, caches: list[History]) -> torch.Tensor:
        return self(tokens, caches, mode="prefill")

    def decode(self, tokens: torch.Tensor, caches: list[History]) -> torch.Tensor:
        return self(tokens, caches, mode="decode")


def random_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=BYTES.vocab_size, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, layers=["attention"])
    return build_model(cfg)


@pytest.mark.parametrize(
    "variant,scoring",
    [("passkey", "teacher_forced"), ("passkey", "generate"),
     ("multikey", "teacher_forced"), ("multivalue", "generate")],
)
def test_a_random_model_scores_near_zero_and_a_perfect_reader_scores_one(variant: str, scoring: str):
    grid = NeedleGrid(lengths=[480, 600], depths=[0, 50, 100], samples=3, variant=variant, scoring=scoring)
    # Chance is ~1e-5 (5 or 7 exact digits), so a random model gets no prompt right.
    random_results = evaluate_needle(random_model(), BYTES, grid, progress=False)
    oracle_results = evaluate_needle(OracleLM(), BYTES, grid, progress=False)
    assert len(random_results) == len(oracle_results) == 2 * 3 * 3
    assert sum(r.correct for r in random_results) == 0
    assert all(r.correct for r in oracle_results)
    if scoring == "generate":  # the oracle stops at EOS, so its output is exactly the answer
        assert all(r.got == " " + r.expected for r in oracle_results)
    order = [(r.length, r.depth, r.sample) for r in oracle_results]
    assert order[:4] == [(480, 0, 0), (480, 0, 1), (480, 0, 2), (480, 50, 0)]


def test_the_answer_loss_is_the_mean_nll_of_the_value_tokens():
    grid = NeedleGrid(lengths=[300], depths=[0, 100], samples=2)
    results = evaluate_needle(OracleLM(), BYTES, grid, progress=False)
    # The oracle's logits are 1 on the right byte and 0 on the other vocab_size - 1 tokens.
    expected = math.log(math.e + BYTES.vocab_size - 1) - 1
    assert all(math.isclose(r.answer_loss, expected, rel_tol=1e-6) for r in results)
    random_results = evaluate_needle(random_model(), BYTES, grid, progress=False)
    assert all(r.answer_loss > 3.0 for r in random_results)  # near ln(vocab) = 5.5: no digit is favoured yet
    # Separators alone (the leading space, ", ") are not part of the value; digits are.
    answer = BYTES.encode(" 1234567, 2345678")
    mask = value_token_mask(BYTES, answer)
    assert "".join(chr(token) for token, is_value in zip(answer, mask) if is_value) == "12345672345678"
    generated = evaluate_needle(OracleLM(), BYTES, NeedleGrid(lengths=[300], depths=[0], scoring="generate"),
                                progress=False)
    assert all(r.answer_loss is None for r in generated)


def test_a_model_that_predicts_the_token_it_was_fed_scores_zero_under_exact_match():
    """Teacher forcing compares position i's prediction with answer token i, not with the token it was fed."""

    class EchoLM(OracleLM):
        def forward(self, tokens, caches=None, mode="train"):
            return torch.nn.functional.one_hot(tokens, BYTES.vocab_size).float()  # "predicts" the current token

    grid = NeedleGrid(lengths=[300], depths=[50], samples=3)
    assert not any(r.correct for r in evaluate_needle(EchoLM(), BYTES, grid, progress=False))


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"depths": [0, 150]}, r"needle depth 150 is outside \[0, 100\]"),
        ({"depths": [-5]}, r"needle depth -5 is outside \[0, 100\]"),
        ({"variant": "haystack"}, r"needle variant 'haystack' is unknown; expected one of passkey, single"),
        ({"scoring": "bleu"}, r"needle scoring 'bleu' is unknown; expected one of teacher_forced, generate"),
        ({"haystack": "wiki"}, r"needle haystack 'wiki' is unknown"),
        ({"lengths": []}, r"context lengths must be a non-empty list"),
        ({"samples": 0}, r"samples .* must be at least 1"),
    ],
)
def test_bad_grid_settings_are_refused(settings: dict, message: str):
    with pytest.raises(EvalError, match=message):
        NeedleGrid(**{"lengths": [256], "depths": [0, 50, 100], **settings})


def test_lengths_too_short_for_the_needle_or_too_long_for_the_model_are_refused():
    model = random_model()  # max_seq_len 4096
    with pytest.raises(EvalError, match=r"context lengths \[8192\] exceed the model's max_seq_len \(4096\)"):
        evaluate_needle(model, BYTES, NeedleGrid(lengths=[256, 8192], depths=[50]), progress=False)
    with pytest.raises(EvalError, match=r"context length 100 is too short for the passkey needle") as refused:
        evaluate_needle(model, BYTES, NeedleGrid(lengths=[100], depths=[50]), progress=False)
    # The length the message asks for is exactly enough: one haystack token.
    needed = int(re.search(r"use a length above (\d+)", str(refused.value)).group(1)) + 1
    prompt = build_prompt(BYTES, variant="passkey", haystack="stdlib", length=needed, depth=50, rng=sample_rng(0, 0))
    assert prompt.question_start - (prompt.needle_end - prompt.needle_start) == 1
    with pytest.raises(EvalError, match="too short for the multivalue needle"):
        evaluate_needle(model, BYTES, NeedleGrid(lengths=[256], depths=[0], variant="multivalue"), progress=False)


def run_eval(args: list[str], cwd: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*launcher, str(REPO / "launch/eval_needle.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_sequence_parallel_and_data_parallel_evals_score_like_one_process(corpus: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    # A hybrid of RAT and attention layers: sp=2 runs both RAT-SP and ring attention.
    overrides = [
        "data=files", f"data.path={corpus}", "model=rat_tiny", "model.layers=[rat,attention]", *TINY,
        "trainer.max_steps=2", f"run_dir={run_dir}",
    ]
    trained = run_train(overrides, tmp_path)
    assert trained.returncode == 0, trained.stderr
    grid = ["eval.lengths=[160,250]", "eval.depths=[0,100]", "eval.samples=3", "progress_bar=false"]
    rows = {}
    for name, nproc, parallel in [("one", 1, []), ("sp2", 2, ["parallel.sp=2"]), ("dp2", 2, ["parallel.sp=1"])]:
        result = run_eval([f"ckpt={run_dir}", *grid, *parallel, f"out_dir={tmp_path / name}"], tmp_path, nproc)
        assert result.returncode == 0, result.stderr
        rows[name] = (tmp_path / name / "samples.jsonl").read_text().splitlines()
    # The answers are those of a barely trained model: token-for-token agreement on 12 of them (lengths that the
    # zigzag layout must pad, both depths) is what says the sharded forward is the same function.
    assert len(rows["one"]) == 12
    # Answers are compared token for token; the answer loss, summed in another order when sharded, to 1e-5.
    one, sp2, dp2 = ([json.loads(line) for line in rows[name]] for name in ("one", "sp2", "dp2"))
    losses = {name: [row.pop("answer_loss") for row in parsed] for name, parsed in (("one", one), ("sp2", sp2), ("dp2", dp2))}
    assert sp2 == one and dp2 == one
    assert all(loss > 0 for loss in losses["one"])
    torch.testing.assert_close(losses["sp2"], losses["one"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["dp2"], losses["one"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_launch_eval_needle_writes_the_report_of_a_trained_run(trained_run: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)  # a copy of its own: the test damages a checkpoint below
    result = run_eval(
        [f"ckpt={run_dir}", "eval.lengths=[128,256]", "eval.depths=[0,50,100]", "eval.samples=2", "eval.seed=3"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "12/12" in result.stderr  # the progress bar went over every prompt
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"mean accuracy \d\.\d{4}", last)

    out_dir = run_dir / "eval" / "needle-step-00000002"
    rows = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2
    assert set(rows[0]) == {
        "length", "depth", "sample", "variant", "scoring", "expected", "got", "correct", "answer_loss"
    }
    assert all(re.fullmatch(r"\d{5}", row["expected"]) for row in rows)
    summary = json.loads((out_dir / "summary.json").read_text())
    mean = sum(row["correct"] for row in rows) / len(rows)
    assert summary["mean_accuracy"] == mean and last == f"mean accuracy {mean:.4f}"
    assert mean <= 0.1  # near chance (~1e-5): two training steps teach no retrieval
    assert (summary["model"], summary["step"], len(summary["cells"])) == ("rat_tiny", 2, 6)
    csv_lines = (out_dir / "summary.csv").read_text().splitlines()
    assert csv_lines[0] == "length,depth,samples,correct,accuracy,answer_loss" and len(csv_lines) == 7
    # Two steps from a random init: the digits' NLL is at chance or above it (ln 10 = 2.30 for a uniform guess).
    assert summary["mean_answer_loss"] > 2.0
    assert result.stdout.strip().splitlines()[-2] == f"mean answer loss {summary['mean_answer_loss']:.4f} nats"
    png = out_dir / "heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A checkpoint whose config no longer matches its weights is refused, and nothing more is written.
    config = run_dir / "step-00000002" / "config.yaml"  # the checkpoint's own, which loading reads first
    config.write_text(config.read_text().replace("d_model: 64", "d_model: 96"))
    mismatched = run_eval([f"ckpt={run_dir}", "eval.lengths=[128]", f"out_dir={tmp_path / 'mismatched'}"], tmp_path)
    assert mismatched.returncode == 2
    assert "does not match the model config" in mismatched.stderr
    assert not (tmp_path / "mismatched").exists()
    pixels = matplotlib.image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300

    # A checkpoint without a config of its own (lsys before 0.2) is read with its run directory's.
    mismatched = tmp_path / "mismatched"
    shutil.copytree(run_dir, mismatched)
    (mismatched / "step-00000002" / "config.yaml").unlink()
    config = OmegaConf.load(mismatched / "config.yaml")
    config.model.d_model = 96
    OmegaConf.save(config, mismatched / "config.yaml")
    refused = run_eval([f"ckpt={mismatched / 'step-00000002'}"], tmp_path)
    assert refused.returncode == 2 and "does not match the model config" in refused.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["ckpt={tmp}/nowhere"], "checkpoint {tmp}/nowhere does not exist"),
        (["ckpt={tmp}", "eval.depths=[0,150]"], "needle depth 150 is outside [0, 100]"),
    ],
)
def test_launch_eval_needle_refuses_bad_input(tmp_path: Path, args: list[str], message: str):
    result = run_eval([arg.format(tmp=tmp_path) for arg in args], tmp_path)
    assert result.returncode == 2
    assert f"lsys: error: {message.format(tmp=tmp_path)}" in result.stderr
    assert not (tmp_path / "eval").exists()


def test_passkey_documents_fill_one_window_each():
    seq_len, micro_batch = 256, 4
    cfg = {"name": "passkey", "source": "passkey", "num_documents": 40, "val_fraction": 0.25}
    train, val = build_loaders(cfg, seq_len=seq_len, micro_batch_size=micro_batch, dp_rank=0, dp_size=1, seed=0,
                               tokenizer=BYTES)
    depths, lengths = [], []
    for inputs, _ in itertools.islice(train, 5):
        for row in inputs.tolist():
            assert row[-1] == BYTES.eos_id and BYTES.eos_id not in row[:-1]  # one whole document per window
            text = bytes(row[:-1]).decode()
            key = re.search(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.", text)
            answer = re.search(rf"What is the pass key\? The pass key is {key.group(1)}(\..*)?$", text)
            assert answer  # the answer, then (for a shorter prompt) more filler to the window's end
            depths.append(key.start() / answer.start())
            lengths.append(answer.start(1) if answer.group(1) else len(text))  # where the answer ends
    assert min(depths) < 0.2 and max(depths) > 0.4  # the needle moves through the haystack
    assert min(lengths) < 0.7 * seq_len and max(lengths) > 0.9 * seq_len  # and the question through the window
    assert val is not None and val.num_batches == 2  # 10 validation documents, generated apart from training


def test_short_keys_are_a_share_of_the_passkey_documents():
    def key_lengths(short_keys: float) -> list[int]:
        documents = passkey_documents(count=400, seq_len=256, tokenizer=BYTES, seed="train", short_keys=short_keys)
        lengths = []
        for text in documents["text"]:
            assert len(BYTES.encode(text)) == 255  # still one window with its EOS
            key = re.search(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", text).group(1)
            assert re.search(rf"What is the pass key\? The pass key is {key}(\..*)?$", text)  # and its answer
            lengths.append(len(key))
        return lengths

    assert set(key_lengths(0.0)) == {5}
    mixed = key_lengths(0.5)
    assert set(mixed) == {1, 2, 3, 4, 5} and 0.4 < mixed.count(5) / len(mixed) < 0.6
    assert set(key_lengths(1.0)) == {1, 2, 3, 4}
    with pytest.raises(DataError, match="data.short_keys must be a share between 0 and 1, got 1.5"):
        passkey_documents(count=4, seq_len=256, tokenizer=BYTES, seed="train", short_keys=1.5)
    with pytest.raises(EvalError, match="a passkey needs at least one digit, got passkey_digits=0"):
        build_prompt(BYTES, variant="passkey", haystack="filler", length=256, depth=50, rng=sample_rng(0, 0),
                     passkey_digits=0)


def test_passkey_documents_need_room_for_the_needle():
    cfg = {"name": "passkey", "source": "passkey", "num_documents": 4}
    with pytest.raises(DataError, match="data.seq_len 64 is too short for passkey documents"):
        build_loaders(cfg, seq_len=64, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0, tokenizer=BYTES)


@pytest.mark.slow
def test_training_logs_needle_accuracy_and_refuses_a_bad_needle_grid(tmp_path: Path):
    common = ["experiment=passkey_tiny", *TINY, "data.seq_len=160", "data.num_documents=64", "trainer.max_steps=2"]
    trained = run_train([*common, "trainer.eval_needle_every=1", f"run_dir={tmp_path / 'run'}"], tmp_path)
    assert trained.returncode == 0, trained.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accuracies = [r["needle_accuracy"] for r in records if "needle_accuracy" in r]
    assert len(accuracies) == 2 and all(0 <= a <= 1 for a in accuracies)
    losses = [r["needle_answer_loss"] for r in records if "needle_answer_loss" in r]
    assert len(losses) == 2 and all(loss > 1.0 for loss in losses)  # two steps teach no digits
    assert "needle 0." in trained.stderr and "needle_loss " in trained.stderr  # and the log line shows both

    bad_grid = ["trainer.eval_needle_every=1", "trainer.needle.lengths=[64]", f"run_dir={tmp_path / 'bad'}"]
    bad = run_train([*common, *bad_grid], tmp_path)
    assert bad.returncode == 2
    assert "trainer.needle: context length 64 is too short for the passkey needle" in bad.stderr
    assert not (tmp_path / "bad").exists()
