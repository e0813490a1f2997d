"""End-to-end training runs through launch/train.py: exact resume, crash safety, bad input."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lsys.config import check_config
from lsys.train.checkpoint import PAUSE_IN_SAVE, latest_checkpoint
from tests.conftest import TINY, compose_config, read_metrics, run_train, train_command


def files_data(corpus: Path) -> list[str]:
    return ["data=files", f"data.path={corpus}"]


@pytest.mark.slow
def test_resume_is_exact_with_two_processes(corpus: Path, tmp_path: Path):
    """A session resumed from step 4 of an 8-step run retraces its steps bitwise (loss, val loss, grad norm, lr) and
    ends where trainer.stop_after_steps (steps of this session) says, with a checkpoint there."""
    common = [
        *files_data(corpus), *TINY, "trainer.max_steps=8", "trainer.grad_accum=2",
        "trainer.checkpoint_every=4", "trainer.eval_every=2",
    ]
    straight_dir = tmp_path / "straight"
    straight = run_train([*common, f"run_dir={straight_dir}"], cwd=tmp_path, nproc=2)
    assert straight.returncode == 0, straight.stderr
    resumed_dir = tmp_path / "resumed"
    resumed = run_train([*common, f"run_dir={resumed_dir}", f"resume={straight_dir / 'step-00000004'}",
                         "trainer.stop_after_steps=2"], cwd=tmp_path, nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step-00000004" in resumed.stderr
    assert sorted(p.name for p in resumed_dir.glob("step-*")) == ["step-00000006"]

    expected = read_metrics(straight_dir)
    got = read_metrics(resumed_dir)
    assert [r["step"] for r in got] == [5, 6]
    for key in ("loss", "val_loss", "grad_norm", "lr", "tokens_seen"):
        assert [r.get(key) for r in got] == [r.get(key) for r in expected[4:6]], key
    assert len({r["loss"] for r in expected}) == 8  # the losses really move, so equality means something


@pytest.mark.slow
def test_sigkill_during_checkpoint_keeps_previous_one(corpus: Path, tmp_path: Path):
    """Kill the trainer in the middle of writing step 4; step 2 stays loadable and resume=auto continues from it."""
    run_dir = tmp_path / "run"
    overrides = [*files_data(corpus), *TINY, "trainer.max_steps=4", "trainer.checkpoint_every=2", f"run_dir={run_dir}"]
    # The checkpointer's test seam holds the save of step 4 once its files are written, before its manifest and
    # rename, and says so by creating `paused`: the kill then lands there every time, not by a race.
    paused = tmp_path / "paused-in-save"
    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_IN_SAVE: f"4:{paused}"}
    process = subprocess.Popen(
        train_command(overrides), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not paused.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert paused.exists(), f"the trainer never reached the save of step 4 (exit code {process.returncode})"
    partial = run_dir / ".step-00000004.tmp"
    assert (partial / "model.safetensors").is_file() and not (partial / "COMPLETE").exists()
    assert not (run_dir / "step-00000004").exists()
    assert latest_checkpoint(run_dir) == run_dir / "step-00000002"  # what resume=auto picks

    resumed = run_train([*overrides, "resume=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run_dir / 'step-00000002'}" in resumed.stderr
    assert (run_dir / "step-00000004" / "COMPLETE").is_file()
    assert not partial.exists()  # the next save cleared the interrupted one


def test_non_finite_loss_stops_without_checkpointing_it(corpus: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_train(
        [*files_data(corpus), *TINY, "optim.lr=1e12", "optim.grad_clip=0", "optim.warmup_fraction=0",
         "trainer.max_steps=20", "trainer.checkpoint_every=1", f"run_dir={run_dir}",
         "trainer.max_weight_growth=null"],  # let the weights blow up until the loss is no longer finite
        cwd=tmp_path,
    )
    assert result.returncode == 1
    message = [line for line in result.stderr.splitlines() if "non-finite" in line]
    assert message, result.stderr
    bad_step = int(message[0].split("at step ")[1].split()[0])
    saved = sorted(p.name for p in run_dir.glob("step-*"))
    assert f"step-{bad_step:08d}" not in saved
    assert all(int(name.split("-")[1]) < bad_step for name in saved)


# Each bad setting names itself in one problem of check_config, what launch/train.py runs before it writes
# anything; from a problem to one stderr line, exit code 2 and an untouched disk is tested end to end below for
# a config problem and a data problem (Hydra composition errors: test_run_safety).
BAD_SETTINGS = {
    "sequence too long for the model": (["data.seq_len=8192"], "exceeds model.max_seq_len (4096)"),
    "chunk size beyond the sequence": (["data.seq_len=8", "model.mixer_options.rat.chunk_size=16"], "exceeds data.seq_len (8)"),
    "heads do not divide d_model": (["model.n_heads=3"], "must be a multiple of model.n_heads (3)"),
    "unknown mixer": (["model.layers=[rat,mamba]"], "unknown mixer 'mamba'"),
    "bad precision": (["trainer.precision=fp8"], "trainer.precision must be auto, fp32 or bf16"),
    "unknown engine": (["parallel.engine=fsdp"], "parallel.engine must be one of ['ddp', 'deepspeed']"),
    "chunk size not positive": (["model.mixer_options.rat.chunk_size=0"], "chunk_size must be positive, got 0"),
    "window not positive": (["model=rat_swa_tiny", "model.mixer_options.local.window=0"], "window must be positive, got 0"),
    "S2 block below 16": (["model=s2_tiny", "model.mixer_options.s2.block_size=8"], "block_size must be at least 16, got 8"),
    "loss chunk not positive": (["trainer.loss_chunk=0"], "trainer.loss_chunk must be a positive number of tokens"),
    "MLP chunk not positive": (["trainer.mlp_chunk=-4"], "trainer.mlp_chunk must be a positive number of tokens"),
    "unknown checkpointing mode": (["trainer.activation_checkpointing=some"], "must be one of none, full, mixer, every_n"),
    "offload without recomputation": (["trainer.offload_activations=true"], "set trainer.activation_checkpointing too"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_each_bad_setting_is_one_problem_that_names_it(case: str):
    overrides, expected = BAD_SETTINGS[case]
    problems = check_config(compose_config(overrides))
    assert len([problem for problem in problems if expected in problem]) == 1, problems


BAD_INPUTS = {
    "heads do not divide d_model": BAD_SETTINGS["heads do not divide d_model"],
    "missing data path": (["data=files", "data.path=/no/such/folder"], "data.path '/no/such/folder' does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_in_one_line_and_writes_nothing(case: str, tmp_path: Path):
    overrides, expected = BAD_INPUTS[case]
    run_dir = tmp_path / "run"
    result = run_train([*overrides, f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if expected in line]
    assert len(lines) == 1, result.stderr
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere: no outputs/, no logs


def test_empty_data_set_is_an_error(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "empty.txt").write_text("")
    result = run_train(["data=files", f"data.path={data}", f"run_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "lsys: error:" in result.stderr and "empty" in result.stderr.lower()
    assert not (tmp_path / "run").exists()


def test_non_utf8_file_is_skipped_with_a_warning(corpus: Path, tmp_path: Path):
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    run_dir = tmp_path / "run"
    result = run_train([*files_data(corpus), *TINY, "trainer.max_steps=1", f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "latin1.txt" in result.stderr and "UTF-8" in result.stderr


def test_existing_checkpoints_are_not_overwritten_without_resume(corpus: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    overrides = [*files_data(corpus), *TINY, "trainer.max_steps=1", f"run_dir={run_dir}"]
    assert run_train(overrides, cwd=tmp_path).returncode == 0
    before = (run_dir / "step-00000001" / "model.safetensors").read_bytes()
    result = run_train([*overrides, "resume=none", "trainer.max_steps=2"], cwd=tmp_path)
    assert result.returncode == 1
    assert "already holds checkpoint step-00000001" in result.stderr
    assert (run_dir / "step-00000001" / "model.safetensors").read_bytes() == before
    assert not (run_dir / "step-00000002").exists()
