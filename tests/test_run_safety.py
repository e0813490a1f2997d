"""Runs that cannot lie or collide: the run-directory lock, orphaned workers, honest resume, the
divergence guard, metrics after a resume, and start-up refusals (memory, Hydra, torchrun)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lsys.train.checkpoint import PAUSE_IN_SAVE
from lsys.train.guard import DivergenceError, DivergenceGuard
from lsys.train.metrics import MetricsLogger
from lsys.train.resume import compare_configs
from lsys.train.run_lock import RunLock, RunLockedError
from tests.conftest import TINY, read_metrics, run_train, train_command

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def files_data(corpus: Path) -> list[str]:
    return ["data=files", f"data.path={corpus}"]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def children_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return found


# --------------------------------------------------------------------------------------------- #
# One job per run directory; no orphans
# --------------------------------------------------------------------------------------------- #
@pytest.mark.slow
def test_a_second_job_on_a_run_directory_in_use_fails_at_once_naming_the_holder(corpus: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    overrides = [*files_data(corpus), *TINY, "trainer.max_steps=3", "trainer.checkpoint_every=1", f"run_dir={run_dir}"]
    # The first job holds (idle, in the checkpointer's test seam) in its save of step 1, the lock taken.
    holding = tmp_path / "first-job-holds"
    first = subprocess.Popen(train_command(overrides), cwd=tmp_path, env={**ENV, PAUSE_IN_SAVE: f"1:{holding}"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(holding.exists, 120, "the first job to reach its first checkpoint")
        # A job that waited for the lock would still be waiting at the timeout: this one must stop at once.
        second = run_train(overrides, cwd=tmp_path, timeout=60)
        assert second.returncode == 2, second.stderr
        assert f"run directory {run_dir} is in use by pid {first.pid} on " in second.stderr
        assert first.poll() is None  # the holder goes on
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the dead holder's lock: the directory can be used again.
    lock = RunLock(run_dir)
    lock.acquire()
    lock.release()


def test_the_lock_is_exclusive_between_processes(tmp_path: Path):
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from lsys.train.run_lock import RunLock; RunLock(sys.argv[1]).acquire()",
             str(tmp_path / "run")],
            capture_output=True, text=True, env=ENV,
        )
        assert probe.returncode != 0
        assert f"is in use by pid {os.getpid()}" in probe.stderr
    finally:
        lock.release()
    again = RunLock(tmp_path / "run")
    again.acquire()  # released: free again
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "run").acquire()  # flock locks belong to the open file, so a second one in-process waits too
    again.release()


def test_a_worker_ends_when_its_launcher_is_killed(tmp_path: Path):
    """end_with_launcher in a child of a stand-in launcher (a process of its own session, as torchrun makes them)."""
    child = (
        "import os, time; from lsys.train.run_lock import end_with_launcher; end_with_launcher(); "
        "print(os.getpid(), flush=True); time.sleep(60)"
    )
    launcher = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); time.sleep(60)"
    )
    env = {**ENV, "TORCHELASTIC_RUN_ID": "test"}
    parent = subprocess.Popen([sys.executable, "-c", launcher], env=env, stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    assert alive(worker)
    parent.kill()
    parent.wait()
    wait_for(lambda: not alive(worker), 10, "the worker to end with its launcher")


@pytest.mark.slow
def test_killing_the_torchrun_launcher_ends_its_workers(corpus: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    overrides = [*files_data(corpus), *TINY, "trainer.max_steps=100000", f"run_dir={run_dir}"]
    launcher = subprocess.Popen(train_command(overrides, nproc=2), cwd=tmp_path, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), 180, "the workers to start training")
        workers = children_of(launcher.pid)
        assert len(workers) == 2, workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        wait_for(lambda: not any(alive(pid) for pid in workers), 30, "the orphaned workers to end")
    finally:
        launcher.kill()
        launcher.wait()


# --------------------------------------------------------------------------------------------- #
# Honest resume
# --------------------------------------------------------------------------------------------- #
def test_config_changes_sort_into_free_optimizer_and_refused():
    saved = {"seed": 1, "optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "trainer": {"max_steps": 10, "log_every": 5},
             "model": {"d_model": 64}}
    current = {"seed": 1, "optim": {"lr": 5e-4, "betas": [0.9, 0.95]}, "trainer": {"max_steps": 20, "log_every": 5},
               "model": {"d_model": 96}, "data": {"new_key": True}}
    changes = compare_configs(saved, current)
    assert changes.free == ["trainer.max_steps: 10 -> 20"]
    assert changes.optimizer == ["optim.lr: 0.001 -> 0.0005"]
    assert changes.refused == ["data.new_key: (unset) -> True", "model.d_model: 64 -> 96"]
    assert compare_configs(saved, saved).refused == []


@pytest.mark.slow
def test_resume_refuses_changed_settings_unless_they_may_change(corpus: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    common = [*files_data(corpus), *TINY, "trainer.checkpoint_every=2", f"run_dir={run_dir}"]
    first = run_train([*common, "trainer.max_steps=2"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    config = (run_dir / "config.yaml").read_text()

    refused = run_train([*common, "trainer.max_steps=4", "optim.lr=5e-4", "model.d_model=96"], cwd=tmp_path)
    assert refused.returncode == 2
    assert "optim.lr: 0.001 -> 0.0005 differs from" in refused.stderr and "resume_overrides=apply" in refused.stderr
    assert "model.d_model: 64 -> 96 would change what" in refused.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]  # the refused session trained nothing

    applied = run_train([*common, "trainer.max_steps=4", "optim.lr=5e-4", "resume_overrides=apply"], cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert "resume: applying optim.lr: 0.001 -> 0.0005" in applied.stderr
    assert "resume: applying trainer.max_steps: 2 -> 4" in applied.stderr
    records = read_metrics(run_dir)
    # The schedule stays where it was (step 3 of a 4-step cosine, warmup 0) and takes the new peak lr.
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["lr"] == pytest.approx(5e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 4))), rel=1e-6)
    assert (run_dir / "config.yaml").read_text() == config  # what the first session ran, untouched
    assert "lr: 0.0005" in (run_dir / "config-step-00000002.yaml").read_text()


# --------------------------------------------------------------------------------------------- #
# Divergence guard
# --------------------------------------------------------------------------------------------- #
def test_guard_stops_spikes_big_gradients_and_exploding_weights():
    guard = DivergenceGuard(spike_factor=3.0, window=4, max_grad_norm=100.0, max_weight_growth=2.0)
    for loss in (5.0, 4.0, 3.0, 2.5):
        guard.check_loss(loss)
    with pytest.raises(DivergenceError, match=r"loss 11 is 3.14 times the median of the last 4 steps \(3\.5\)"):
        guard.check_loss(11.0)
    guard.check_loss(10.0)  # under 3 x 3.5
    with pytest.raises(DivergenceError, match="non-finite loss nan"):
        guard.check_loss(float("nan"))
    guard.check_grad_norm(100.0)
    with pytest.raises(DivergenceError, match="grad norm 101 is above trainer.max_grad_norm_abort"):
        guard.check_grad_norm(101.0)
    with pytest.raises(DivergenceError, match="non-finite grad norm inf"):
        guard.check_grad_norm(float("inf"))
    guard.check_weights(10.0)
    guard.check_weights(19.0)
    with pytest.raises(DivergenceError, match="weights' norm from 19 to 40"):
        guard.check_weights(40.0)
    off = DivergenceGuard(spike_factor=None, window=1, max_grad_norm=None, max_weight_growth=2.0)
    off.check_loss(1e9)  # those tests are off
    off.check_grad_norm(1e9)
    off.check_weights(1.0)
    with pytest.raises(DivergenceError):
        off.check_weights(float("nan"))


def test_an_exploding_lr_stops_before_any_exploded_step_is_saved(corpus: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    overrides = [*files_data(corpus), *TINY, "trainer.max_steps=6", "trainer.checkpoint_every=1", f"run_dir={run_dir}"]
    healthy = run_train([*overrides, "trainer.max_steps=2"], cwd=tmp_path)
    assert healthy.returncode == 0, healthy.stderr
    good = run_dir / "step-00000002" / "model.safetensors"
    before = good.read_bytes()
    exploded = run_train([*overrides, "optim.lr=1e6", "resume_overrides=apply"], cwd=tmp_path)
    assert exploded.returncode == 1
    assert "training stopped at step 3 (the update took the weights' norm from" in exploded.stderr
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-00000001", "step-00000002"]
    assert good.read_bytes() == before
    # The message names the checkpoint to go back to and the command that does it with a lower lr.
    assert f"The newest checkpoint, written before it, is {run_dir / 'step-00000002'}" in exploded.stderr
    command = exploded.stderr.split("resume from it with a lower lr:\n")[1].splitlines()[0].strip()
    assert command.startswith("python launch/train.py ") and "optim.lr=100000 resume_overrides=apply" in command
    assert f"resume={run_dir / 'step-00000002'}" in command and "optim.lr=1e6" not in command

    fresh = run_train([*overrides, f"run_dir={tmp_path / 'fresh'}", "optim.lr=1e6"], cwd=tmp_path)
    assert fresh.returncode == 1
    assert "No checkpoint was written before it; start again with a lower lr, e.g. optim.lr=100000" in fresh.stderr
    assert not list((tmp_path / "fresh").glob("step-*"))


# --------------------------------------------------------------------------------------------- #
# metrics.jsonl after a resume
# --------------------------------------------------------------------------------------------- #
def test_metrics_logger_drops_the_steps_a_resume_replays(tmp_path: Path):
    lines = [json.dumps({"step": step, "loss": 1.0}) for step in (1, 2, 3, 4, 5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, start_step=3)
    logger.write({"step": 4, "loss": 0.5})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert read_metrics(tmp_path)[-1]["loss"] == 0.5


@pytest.mark.slow
def test_metrics_after_kill_and_resume_hold_each_step_once(corpus: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    overrides = [*files_data(corpus), *TINY, "trainer.checkpoint_every=3", f"run_dir={run_dir}"]
    job = subprocess.Popen(train_command([*overrides, "trainer.max_steps=100000"]), cwd=tmp_path, env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 5, 120,
                 "records past the first checkpoint")
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    killed_at = read_metrics(run_dir)[-1]["step"]
    resumed = run_train([*overrides, f"trainer.max_steps={killed_at + 2}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, killed_at + 3))


# --------------------------------------------------------------------------------------------- #
# Start-up refusals
# --------------------------------------------------------------------------------------------- #
def test_a_model_too_large_for_the_machine_is_refused_quickly(tmp_path: Path):
    # 5B parameters: building them (20 GB in fp32) would outlast the timeout or the machine's memory.
    result = run_train(["model=rat_1b", "model.n_layers=96", f"run_dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    line = [line for line in result.stderr.splitlines() if "lsys: config error:" in line]
    assert len(line) == 1 and "needs" in line[0] and "trainer.skip_memory_check=true" in line[0], result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model=rat_huge", "Could not find 'model/rat_huge'"),
        ("trainer.max_stepz=3", "unknown config key trainer.max_stepz: TrainerConfig has no such setting"),
        ("+trainer.max_stepz=3", "unknown config key trainer.max_stepz: TrainerConfig has no such setting"),
        ("+data.pathh=x", "unknown config key data.pathh: DataConfig has no such setting (did you mean data.path?)"),
    ],
)
def test_hydra_composition_errors_are_one_line_and_exit_2(override: str, message: str, tmp_path: Path):
    result = run_train([override], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("lsys: config error: ")
    assert message in result.stderr


@pytest.mark.slow
def test_a_start_up_error_under_torchrun_is_one_line_from_rank_0_and_exit_code_2(tmp_path: Path):
    result = run_train(["data=files", "data.path=/no/such/folder", f"run_dir={tmp_path / 'run'}"], cwd=tmp_path,
                       nproc=2)
    assert [line for line in result.stderr.splitlines() if line.startswith("lsys:")] == [
        "lsys: error: data.path '/no/such/folder' does not exist"
    ]
    # The one traceback is torchrun's own report (ChildFailedError), which no worker can silence.
    assert result.stderr.count("Traceback (most recent call last)") == 1 and "ChildFailedError" in result.stderr
    assert "exitcode  : 2" in result.stderr  # the code torchrun reports for the failed worker


def _hang_worker(rank: int, world_size: int, port: int, out_file: str) -> None:
    import torch.distributed as dist

    from parallel import init_distributed
    from parallel.mesh import collective_failure

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    init_distributed("gloo", timeout_s=2)
    if rank == 1:
        time.sleep(8)  # a rank that hangs: it never joins the all-reduce
        os._exit(0)
    start = time.monotonic()
    try:
        dist.all_reduce(__import__("torch").ones(1))
    except RuntimeError as error:
        result = {"seconds": time.monotonic() - start, "reported": collective_failure(error)}
        Path(out_file).write_text(json.dumps(result))
    os._exit(0)


def test_a_hanging_rank_ends_the_others_collective_after_parallel_timeout_s(tmp_path: Path):
    import torch.multiprocessing as mp

    from tests.local_ranks import _free_port

    out = tmp_path / "out.json"
    mp.start_processes(_hang_worker, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn")
    result = json.loads(out.read_text())
    assert result["reported"], result  # a collective failure, which lsys.train.trainer.run reports as such
    assert 1.5 < result["seconds"] < 6, result  # parallel.timeout_s = 2 ended the wait, not the peer's exit at 8 s
