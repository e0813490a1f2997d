"""SFT training: the answer loss does not depend on how examples are laid out, and launch/sft.py runs as a job
(from a pretrained checkpoint, resumed exactly, refusing bad data in one line)."""

import json
from pathlib import Path

import pytest
import torch

from lsys.data import ByteTokenizer, build_loaders
from lsys.models import LM, ModelConfig
from lsys.train.engine import IGNORE_INDEX, summed_loss
from tests.conftest import TINY, read_metrics, run_train

SEQ_LEN = 128  # the plain template's longest example here takes about 116 byte tokens


def chat_examples(count: int, seed: int) -> list[dict]:
    """Chats of one or two exchanges, a system turn in some, of varied lengths (most share a window when packed)."""
    generator = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "key", "value", "seven", "blue", "river", "stone"]

    def text(low: int, high: int) -> str:
        size = int(torch.randint(low, high, (1,), generator=generator))
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (size,), generator=generator))

    examples = []
    for index in range(count):
        turns = [{"role": "system", "content": text(1, 2)}] if index % 3 == 0 else []
        for _ in range(1 + index % 2):
            turns += [{"role": "user", "content": text(1, 3)}, {"role": "assistant", "content": text(1, 3)}]
        examples.append({"messages": turns})
    return examples


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def epoch_batches(path: Path, packing: bool) -> list[tuple[torch.Tensor, ...]]:
    """Every window of the examples once, through the real loader (one rank, one window a batch)."""
    data = {"name": "chats", "source": "files", "path": str(path), "format": "messages", "doc_isolation": True,
            "packing": packing, "val_fraction": 0.0, "tokenizer": {"kind": "byte"}}
    train, val = build_loaders(data, seq_len=SEQ_LEN, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0,
                               tokenizer=ByteTokenizer())
    assert val is None
    return [next(train) for _ in range(train.batches_per_epoch)]


def hybrid_model() -> LM:
    torch.manual_seed(0)
    cfg = ModelConfig(name="hybrid", vocab_size=257, d_model=32, n_layers=4, n_heads=4, ffn_dim=64, max_seq_len=512,
                      layers=["rat", "local", "lightning", "attention"],
                      mixer_options={"rat": {"chunk_size": 4}, "local": {"window": 6}})
    return LM(cfg).double()


def mean_answer_loss(model: LM, batches: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss per answer token over all batches, as the engines form it, and its gradients."""
    total = sum(summed_loss(model, batch, torch.device("cpu"), torch.autocast("cpu", enabled=False))
                for batch in batches)
    count = sum(int((batch[1] != IGNORE_INDEX).sum()) for batch in batches)
    loss = total / count
    return loss, list(torch.autograd.grad(loss, list(model.parameters())))


def test_packed_and_unpacked_examples_give_the_same_answer_loss_and_gradients(tmp_path: Path):
    path = write_jsonl(tmp_path / "chats.jsonl", chat_examples(count=11, seed=3))
    packed, unpacked = epoch_batches(path, packing=True), epoch_batches(path, packing=False)
    assert len(unpacked) == 11 and len(packed) < len(unpacked)  # packing shares windows
    assert any(int(batch[2].max()) >= 2 for batch in packed)  # some windows hold two examples and padding
    model = hybrid_model()
    packed_loss, packed_grads = mean_answer_loss(model, packed)
    unpacked_loss, unpacked_grads = mean_answer_loss(model, unpacked)
    # float64 end to end: only summation order differs.
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-12, atol=0)
    for got, want in zip(packed_grads, unpacked_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-13)
    # Without isolation the packed examples would see each other: the same windows then give another loss.
    mixed = [(inputs, targets) for inputs, targets, _ in packed]
    assert abs(mean_answer_loss(model, mixed)[0].item() - packed_loss.item()) > 1e-6


# --- launch/sft.py as a job ---------------------------------------------------------------------------------------


def sft_command(data: Path, run_dir: Path, *extra: str) -> list[str]:
    tiny = [override for override in TINY if not override.startswith("data.seq_len=")]
    return [*tiny, "model=rat_tiny", "data=sft", f"data.seq_len={SEQ_LEN}", f"data.path={data}", f"run_dir={run_dir}",
            "trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.eval_every=3", *extra]


@pytest.mark.slow
def test_sft_starts_from_pretrained_weights_and_resumes_exactly(trained_run: Path, tmp_path: Path):
    pretrained = trained_run  # 2 steps of pretraining on text
    data = write_jsonl(tmp_path / "chats.jsonl", chat_examples(count=80, seed=4))
    common = ["data.val_fraction=0.2", f"init_from={pretrained}"]
    # One process: the answer-token count over ranks and micro-batches is checked at dp 2 and with accumulation in
    # tests/test_parallel_training.py and tests/test_deepspeed.py; here, the job's own path (init_from, resume).
    straight = run_train(sft_command(data, tmp_path / "straight", *common), cwd=tmp_path, script="launch/sft.py")
    assert straight.returncode == 0, straight.stderr
    assert f"weights from {pretrained / 'step-00000002'} (init_from)" in straight.stderr
    records = read_metrics(tmp_path / "straight")
    assert [r["step"] for r in records] == list(range(1, 7)) and "val_loss" in records[2]
    # (That init_from loads exactly the pretrained weights: tests/test_deepspeed.py, from ZeRO shards.)
    split_dir = tmp_path / "split"
    for extra in (["trainer.stop_after_steps=3"], []):
        result = run_train(sft_command(data, split_dir, *common, *extra), cwd=tmp_path, script="launch/sft.py")
        assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr
    resumed = read_metrics(split_dir)
    for key in ("loss", "val_loss", "grad_norm"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in records], key

    # Held-out scores of the tuned model: one process answering, and the loss alone with each sequence on 2 ranks.
    data_args = ["data=sft", f"data.path={data}", "data.val_fraction=0.2", f"data.seq_len={SEQ_LEN}"]
    scores = {}
    for name, nproc, extra in (("sp1", 1, ["eval.samples=4", "eval.max_new_tokens=6"]),
                               ("sp2", 2, ["parallel.sp=2", "eval.samples=0"])):
        out_dir = tmp_path / f"eval-{name}"
        result = run_train([f"ckpt={tmp_path / 'straight'}", *data_args, f"out_dir={out_dir}", "progress_bar=false",
                            *extra], cwd=tmp_path, nproc=nproc, script="launch/eval_sft.py")
        assert result.returncode == 0, result.stderr
        scores[name] = json.loads((out_dir / "summary.json").read_text())
    assert scores["sp1"]["answered"] == 4 and 0 <= scores["sp1"]["rouge_l"] <= 1
    assert len((tmp_path / "eval-sp1" / "answers.jsonl").read_text().splitlines()) == 4
    assert scores["sp1"]["loss_examples"] == scores["sp2"]["loss_examples"] > 4
    assert scores["sp2"]["answer_loss"] == pytest.approx(scores["sp1"]["answer_loss"], rel=1e-5)


def test_bad_sft_data_is_one_line_naming_the_example_and_exit_code_2(tmp_path: Path):
    """Each kind of bad example is refused in tests/test_sft_data.py; here one of them ends a real job."""
    records = chat_examples(count=6, seed=5)
    records.insert(4, {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "ok"}]})
    data = write_jsonl(tmp_path / "chats.jsonl", records)
    result = run_train(sft_command(data, tmp_path / "run", "data.val_fraction=0"), cwd=tmp_path,
                       script="launch/sft.py")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("lsys:")]
    assert len(errors) == 1 and "example 4" in errors[0] and "data.truncation" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


# --- held-out scores (lsys/eval/sft.py) ---------------------------------------------------------------------------


def test_rouge_l_and_exact_match_on_known_pairs():
    from lsys.eval.sft import exact_match, rouge_l

    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # common subsequence a c d: P = R = 3/4
    assert rouge_l("the cat", "the cat sat on the mat") == pytest.approx(2 * 1.0 * (2 / 6) / (1.0 + 2 / 6))
    assert rouge_l("'utf-8'", '"utf-8"') == pytest.approx(0.6)  # utf - 8 common; the quotes differ
    assert rouge_l("", "x") == 0.0 and rouge_l("y", "x") == 0.0 and rouge_l("X y", "x Y") == 1.0  # lower-cased
    assert exact_match(" 4096\n", "4096") and not exact_match("4096", "40960")


def test_answer_prompt_is_the_conversation_up_to_its_last_answer():
    from lsys.data.chat import PlainTemplate
    from lsys.eval.sft import answer_prompt

    tokenizer = ByteTokenizer()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Key?"}, {"role": "assistant", "content": "42"}]
    prompt, reference = answer_prompt(messages, PlainTemplate(tokenizer.eos_id), tokenizer)
    assert reference == "42"
    assert prompt == [*b"<|user|>\nHi\n<|assistant|>\nHello", tokenizer.eos_id, *b"<|user|>\nKey?\n<|assistant|>\n"]
