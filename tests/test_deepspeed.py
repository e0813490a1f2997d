"""The DeepSpeed ZeRO engine on CPU (DeepSpeed's CPU accelerator, real `deepspeed.initialize` on gloo):
the same training as DDP at every stage and over dp x sp, sharded checkpoints that resume exactly,
export to one safetensors file, the memory formulas against what DeepSpeed allocates (2 and 4 ranks),
and bad input.

Tolerance: fp32 losses and gradient norms of ZeRO 0-3 equal DDP's to 1e-5 relative over 20 steps
(the same sums reduced in another order); resumed runs equal straight ones bitwise.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lsys.hydra_app import compose_config as compose_app_config

from lsys.config import activation_plan, check_config, model_config
from lsys.generate import load_for_generation
from lsys.models import build_model
from lsys.train.checkpoint import Checkpointer
from lsys.train.deepspeed_config import DeepSpeedConfigError, deepspeed_config
from lsys.train.engine import build_engine
from lsys.train.export import export_checkpoint
from lsys.train.guard import DivergenceGuard
from lsys.train.memory import training_state
from parallel import World, init_mesh
from parallel.mesh import shutdown
from tests.conftest import CONF_DIR, TINY, read_metrics, run_train, train_command, write_corpus
from tests.local_ranks import run_local_ranks

RTOL = 1e-5
STEPS, MICRO_BATCH, SEQ_LEN = 20, 2, 32
OPEN_GUARD = dict(spike_factor=None, window=1, max_grad_norm=None, max_weight_growth=None)
# Blocks recomputed in backward (ZeRO-3 gathers and frees their weights again), a tiled loss and MLP.
RECOMPUTED = ["trainer.activation_checkpointing=full", "trainer.loss_chunk=24", "trainer.mlp_chunk=16"]
SETUPS = {
    "ddp": [],
    "zero0": ["parallel.engine=deepspeed", "parallel.zero_stage=0"],
    "zero1": ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
    "zero2_offload": ["parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.offload=optimizer"],
    "zero3_recomputed": ["parallel.engine=deepspeed", "parallel.zero_stage=3", *RECOMPUTED],
}


def compose_config(
    overrides: list[str], model: str = "rat_tiny", seq_len: int = SEQ_LEN, micro_batch: int = MICRO_BATCH,
    grad_accum: int = 1,
):
    base = [f"model={model}", "model.d_model=64", "model.n_layers=2", "model.ffn_dim=128", f"data.seq_len={seq_len}",
            f"trainer.micro_batch_size={micro_batch}", f"trainer.grad_accum={grad_accum}", "optim.warmup_fraction=0"]
    return compose_app_config(CONF_DIR, "config", [*base, *overrides])


def fixed_batches(rows: int, seq_len: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, 257, (rows, seq_len + 1), generator=generator) for _ in range(STEPS)]


def answer_steps(rows: slice) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, this rank's two micro-batches of one window each, whose targets carry loss only in random
    spans (-100 elsewhere, as SFT's prompts): the micro-batches and ranks hold different numbers of them."""
    generator = torch.Generator().manual_seed(8)
    steps = []
    for tokens in fixed_batches(2 * MICRO_BATCH, SEQ_LEN):
        targets = tokens[:, 1:].clone()
        prompt = torch.rand(2 * MICRO_BATCH, SEQ_LEN // 4, generator=generator) < 0.6
        targets[prompt.repeat_interleave(4, dim=1)] = -100
        inputs, targets = tokens[rows, :-1], targets[rows]
        steps.append([(inputs[:1], targets[:1]), (inputs[1:], targets[1:])])
    return steps


def held_bytes(engine, model) -> dict[str, float]:
    """What this rank really holds: weights (ZeRO-3: its shards), and the optimizer state: AdamW's moments
    plus the fp32 master partition ZeRO keeps (read from DeepSpeed's optimizer, under its own names)."""
    weights = sum(p.ds_tensor.nbytes if hasattr(p, "ds_tensor") else p.nbytes for p in model.parameters())
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the AdamW it was given
    optimizer = sum(t.nbytes for state in base.state.values() for t in state.values() if torch.is_tensor(t) and t.dim())
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-1/2, ZeRO-3
        optimizer += sum(t.nbytes for t in getattr(engine.optimizer, name, []))
    return {"weights": weights, "optimizer": optimizer}


def _stages_worker(rank: int, world_size: int, out_file: str, export_dir: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    world = World(rank, world_size, rank, torch.device("cpu"))
    rows = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
    results = {}
    for name, overrides in SETUPS.items():
        cfg = compose_config(overrides, micro_batch=1, grad_accum=2)  # as answer_steps lays the windows
        torch.manual_seed(0)
        model = build_model(model_config(cfg), activations=activation_plan(cfg.trainer))
        engine = build_engine(model, cfg, world=world, max_steps=STEPS)
        guard = DivergenceGuard(**OPEN_GUARD)
        steps = [engine.train_step(micro_batches, guard) for micro_batches in answer_steps(rows)]
        results[name] = {
            "loss": [step.loss for step in steps], "grad_norm": [step.grad_norm for step in steps],
            "weight_norm": steps[-1].weight_norm, "held": held_bytes(engine, model), "parameters": model.num_params(),
            "optimizer_class": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
        }
        if name == "zero3":  # the hardest case for export: every weight sharded
            tokens = torch.randint(0, 257, (1, SEQ_LEN), generator=torch.Generator().manual_seed(3))
            with torch.no_grad(), engine.full_weights():
                results["live_logits"] = model(tokens).tolist()
            checkpointer = Checkpointer(Path(export_dir) / "run", world, keep=1)
            saved = checkpointer.save(STEPS, engine, {"step": STEPS, "scheduler": engine.scheduler.state_dict()},
                                      {}, config={"model": dict(cfg.model), "data": dict(cfg.data)})
            if rank == 0:
                export_checkpoint(saved, Path(export_dir) / "export")
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))


@pytest.mark.slow
def test_zero_stages_train_like_ddp_and_export_what_they_trained(tmp_path: Path):
    out = tmp_path / "results.json"
    run_local_ranks(_stages_worker, 2, str(out), str(tmp_path))
    results = json.loads(out.read_text())
    ddp = results["ddp"]
    assert len(set(ddp["loss"])) == STEPS  # the losses move, so equality means something
    for name in ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_recomputed"):  # offload: CPU Adam
        torch.testing.assert_close(results[name]["loss"], ddp["loss"], rtol=RTOL, atol=0, msg=name)
        torch.testing.assert_close(results[name]["grad_norm"], ddp["grad_norm"], rtol=RTOL, atol=0, msg=name)
        assert results[name]["weight_norm"] == pytest.approx(ddp["weight_norm"], rel=RTOL), name

    assert results["zero2_offload"]["optimizer_class"] == "DeepSpeedCPUAdam"
    # What each rank holds, against the formulas of lsys.train.memory (fp32, 2 ranks), within 5%.
    parameters = ddp["parameters"]
    for name, stage in (("ddp", 0), ("zero1", 1), ("zero2", 2), ("zero3", 3)):
        expected = training_state(parameters, engine="ddp" if name == "ddp" else "deepspeed", zero_stage=stage,
                                  offload="none", world_size=2, bf16=False)
        held = results[name]["held"]
        assert held["weights"] == pytest.approx(expected.weights, rel=0.05), name
        assert held["optimizer"] == pytest.approx(expected.optimizer, rel=0.05), name

    # The export of the ZeRO-3 checkpoint is one safetensors file giving the live model's logits.
    model, _, step = load_for_generation(tmp_path / "export")
    tokens = torch.randint(0, 257, (1, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), torch.tensor(results["live_logits"]), rtol=1e-5, atol=1e-6)
    assert step == STEPS and sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "COMPLETE", "config.yaml", "model.safetensors"
    ]


def files_data(corpus: Path) -> list[str]:
    return ["data=files", f"data.path={corpus}"]


def start_until_past_step_4(command: list[str], cwd: Path, run_dir: Path, **popen) -> subprocess.Popen:
    """Start a job and return once it has saved step 4 and logged step 5: a kill then lands mid-run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, cwd=cwd, env=env, **popen)
    deadline = time.monotonic() + 240
    while not ((run_dir / "step-00000004" / "COMPLETE").is_file() and len(read_metrics(run_dir)) >= 5):
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    return job


ZERO_RUN = [*TINY, "parallel.engine=deepspeed", "parallel.zero_stage=2", "trainer.max_steps=8",
            "trainer.checkpoint_every=4", "trainer.eval_every=4"]


@pytest.fixture(scope="session")  # once per session (per xdist worker): its users may be far apart
def zero_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """A ZeRO-2 run on 2 processes that was never stopped: (its overrides, less run_dir; its run directory).
    Tests read it and write elsewhere."""
    folder = tmp_path_factory.mktemp("zero_run")
    common = [*files_data(write_corpus(folder / "corpus")), *ZERO_RUN]
    straight = run_train([*common, f"run_dir={folder / 'straight'}"], cwd=folder, nproc=2)
    assert straight.returncode == 0, straight.stderr
    return common, folder / "straight"


@pytest.mark.slow
def test_a_zero_run_killed_whole_or_in_one_worker_ends_as_if_it_never_stopped(zero_run, tmp_path: Path):
    from tests.test_run_safety import children_of

    common, straight = zero_run
    expected = read_metrics(straight)

    # SIGKILL of launcher and workers at once, past the step-4 checkpoint; a new job resumes from its shards.
    killed = tmp_path / "killed"
    job = start_until_past_step_4(train_command([*common, f"run_dir={killed}"], nproc=2), tmp_path, killed,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    shards = sorted(p.name for p in (killed / "step-00000004" / "zero").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    resumed = run_train([*common, f"run_dir={killed}"], cwd=tmp_path, nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    got = read_metrics(killed)
    assert [r["step"] for r in got] == list(range(1, 9))
    for key in ("loss", "val_loss", "grad_norm", "lr"):
        assert [r.get(key) for r in got] == [r.get(key) for r in expected], key

    # SIGKILL of one worker under --max-restarts=1: torchrun restarts both, which resume by themselves.
    restarted = tmp_path / "restarted"
    command = train_command([*common, f"run_dir={restarted}"], nproc=2)
    command.insert(command.index("--standalone"), "--max-restarts=1")
    launcher = start_until_past_step_4(command, tmp_path, restarted, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    os.kill(max(children_of(launcher.pid)), signal.SIGKILL)
    output = launcher.communicate(timeout=600)[0]
    assert launcher.returncode == 0, output
    assert "resumed from" in (restarted / "train.log").read_text()
    got = read_metrics(restarted)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]


BAD_DEEPSPEED = {
    "unknown zero stage": (["parallel.zero_stage=4"], "parallel.zero_stage must be one of (0, 1, 2, 3), got 4"),
    "params offload without stage 3": (["parallel.offload=optimizer_and_params"],
                                       "parallel.offload=optimizer_and_params needs parallel.zero_stage=3"),
    "missing json": (["parallel.deepspeed_config=/no/such.json"], "parallel.deepspeed_config '/no/such.json' does not exist"),
    "json that does not parse": (["parallel.deepspeed_config={tmp}/bad.json"], "is not valid JSON"),
    "json batch size against the trainer's": (
        ["parallel.deepspeed_config={tmp}/batch.json"],
        "parallel.deepspeed_config sets train_batch_size = 999, but trainer.micro_batch_size x trainer.grad_accum x "
        "world size gives 2",  # compose_config's micro batch of 2, 1 rank
    ),
}


def deepspeed_problems(overrides: list[str]) -> list[str]:
    """What launch/train.py finds wrong before it writes anything: check_config, then the full DeepSpeed config
    (its batch size needs the world size), here 1 rank."""
    cfg = compose_config(["parallel.engine=deepspeed", *overrides])
    problems = check_config(cfg)
    if not problems:
        try:
            deepspeed_config(cfg, 1, bf16=False)
        except DeepSpeedConfigError as error:
            problems = error.problems
    return problems


@pytest.mark.parametrize("case", sorted(BAD_DEEPSPEED))
def test_each_bad_deepspeed_setting_is_one_problem_that_names_it(case: str, tmp_path: Path):
    (tmp_path / "bad.json").write_text("{ not json")
    (tmp_path / "batch.json").write_text(json.dumps({"train_batch_size": 999, "zero_optimization": {"overlap_comm": True}}))
    overrides, expected = BAD_DEEPSPEED[case]
    problems = deepspeed_problems([o.format(tmp=tmp_path) for o in overrides])
    assert len([problem for problem in problems if expected in problem]) == 1, problems


def test_a_bad_deepspeed_setting_fails_in_one_line_and_writes_nothing(tmp_path: Path):
    """End to end: the batch-size check, the one that runs once the world size is known (here 1)."""
    (tmp_path / "batch.json").write_text(json.dumps({"train_batch_size": 999}))
    run_dir = tmp_path / "run"
    result = run_train([*TINY, "parallel.engine=deepspeed", f"parallel.deepspeed_config={tmp_path / 'batch.json'}",
                        f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("lsys:")]
    assert len(lines) == 1 and lines[0].startswith("lsys: config error: "), result.stderr
    assert "sets train_batch_size = 999, but trainer.micro_batch_size x trainer.grad_accum x world size gives 2" \
        in lines[0]
    assert not run_dir.exists()


def test_export_refuses_a_folder_that_is_not_a_complete_checkpoint(tmp_path: Path):
    (tmp_path / "step-00000003").mkdir()
    result = subprocess.run(
        [sys.executable, str(CONF_DIR.parent / "launch/export.py"), f"ckpt={tmp_path / 'step-00000003'}",
         f"out={tmp_path / 'out'}"], capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lsys: error: checkpoint {tmp_path / 'step-00000003'} is incomplete (no COMPLETE manifest): its save was "
        "interrupted"
    ]
    assert not (tmp_path / "out").exists()


def node_command(node_rank: int, port: int, overrides: list[str]) -> list[str]:
    """One 'node' of a two-node job on this machine: 2 ranks each, node ranks 0 and 1, rendezvous on 127.0.0.1."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", f"--node_rank={node_rank}",
        "--master_addr=127.0.0.1", f"--master_port={port}", str(CONF_DIR.parent / "launch/train.py"), *overrides,
    ]


def run_two_nodes(overrides: list[str], cwd: Path) -> None:
    from tests.local_ranks import _free_port

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(node_command(rank, port, overrides), cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output


@pytest.mark.slow
def test_two_nodes_train_zero2_over_dp_and_sp_checkpoint_stop_and_resume(corpus: Path, tmp_path: Path):
    common = [*files_data(corpus), *TINY, "parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.sp=2",
              "trainer.max_steps=4", "trainer.checkpoint_every=2"]
    first = tmp_path / "first"
    run_two_nodes([*common, f"run_dir={first}"], tmp_path)
    assert "dp 2 x sp 2" in (first / "train.log").read_text()
    # A second job of two nodes resumes from the first one's step-2 shards and retraces its steps 3 and 4.
    resumed = tmp_path / "resumed"
    run_two_nodes([*common, f"run_dir={resumed}", f"resume={first / 'step-00000002'}"], tmp_path)
    expected, got = read_metrics(first), read_metrics(resumed)
    assert [r["step"] for r in got] == [3, 4]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected[2:]]


SP_STEPS, SP_SEQ_LEN = 5, 64  # zigzag over sp=2 cuts 64 tokens into pieces of one RAT chunk (16)


def sp_losses(cfg, world: World, rows: slice, positions: torch.Tensor) -> tuple[list[float], dict[str, float]]:
    """The losses of SP_STEPS steps, and the bytes this rank holds (held_bytes)."""
    torch.manual_seed(0)
    model = build_model(model_config(cfg), activations=activation_plan(cfg.trainer))
    engine = build_engine(model, cfg, world=world, max_steps=SP_STEPS)
    guard = DivergenceGuard(**OPEN_GUARD)
    losses = [engine.train_step([(batch[rows, :-1][:, positions], batch[rows, 1:][:, positions])], guard).loss
              for batch in fixed_batches(2 * MICRO_BATCH, SP_SEQ_LEN)[:SP_STEPS]]
    return losses, held_bytes(engine, model)


def _dp_sp_worker(rank: int, world_size: int, out_file: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    world = World(rank, world_size, rank, torch.device("cpu"))
    results = {}
    # "3r": ZeRO-3 with every block recomputed in backward, its RAT-SP exchange included.
    for stage, recompute in ((2, []), (3, []), ("3r", RECOMPUTED)):
        cfg = compose_config(["parallel.engine=deepspeed", f"parallel.zero_stage={str(stage)[0]}", "parallel.sp=2",
                              *recompute], seq_len=SP_SEQ_LEN)
        mesh = init_mesh(world, sp=2, sp_mode="ring", layout=cfg.parallel.layout)
        rows = slice(mesh.dp_rank * MICRO_BATCH, (mesh.dp_rank + 1) * MICRO_BATCH)
        losses, held = sp_losses(cfg, world, rows, mesh.layout.positions(mesh.sp_rank, SP_SEQ_LEN))
        results[stage] = {"loss": losses, "held": held}
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))


@pytest.mark.slow
def test_zero2_and_zero3_over_dp2_by_sp2_train_like_one_process_and_hold_their_shards(tmp_path: Path):
    out = tmp_path / "losses.json"
    run_local_ranks(_dp_sp_worker, 4, str(out))
    results = json.loads(out.read_text())
    world = World(0, 1, 0, torch.device("cpu"))
    init_mesh(world)
    cfg = compose_config([], seq_len=SP_SEQ_LEN)
    expected, _ = sp_losses(cfg, world, slice(None), torch.arange(SP_SEQ_LEN))  # DDP
    shutdown()
    assert len(set(expected)) == SP_STEPS
    parameters = build_model(model_config(cfg)).num_params()
    for stage in ("2", "3", "3r"):
        torch.testing.assert_close(results[stage]["loss"], expected, rtol=2e-5, atol=0, msg=f"ZeRO-{stage}")
        if stage == "3r":
            continue
        # All 4 ranks are DeepSpeed's data-parallel group: the formulas at 4 ranks, within 5%.
        formula = training_state(parameters, engine="deepspeed", zero_stage=int(stage), offload="none", world_size=4,
                                 bf16=False)
        held = results[stage]["held"]
        assert held["weights"] == pytest.approx(formula.weights, rel=0.05), stage
        assert held["optimizer"] == pytest.approx(formula.optimizer, rel=0.05), stage


@pytest.mark.slow
def test_a_zero_checkpoint_continues_on_another_world_size_from_its_weights_only_when_asked(zero_run, tmp_path: Path):
    from safetensors.torch import load_file

    from lsys.train.export import consolidated_weights

    common, straight = zero_run
    sharded_checkpoint, run_dir = straight / "step-00000008", tmp_path / "run"
    one_process = [*[o for o in common if not o.startswith("parallel.")], "trainer.max_steps=9",
                   "trainer.checkpoint_every=9", f"resume={sharded_checkpoint}", f"run_dir={run_dir}"]
    refused = run_train(one_process, cwd=tmp_path)
    assert refused.returncode == 1
    assert "was written by 2 ranks, this job has 1: resume with --nproc_per_node=2, or pass resume_weights_only=true" \
        in refused.stderr
    # With an lr of nothing, the one step it takes leaves the weights as they came: those of the shards.
    continued = run_train([*one_process, "resume_weights_only=true", "optim.lr=1e-12", "resume_overrides=apply"],
                          cwd=tmp_path)
    assert continued.returncode == 0, continued.stderr
    assert "with a fresh optimizer and data order" in continued.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == [9]
    sharded = consolidated_weights(sharded_checkpoint)
    saved = load_file(run_dir / "step-00000009" / "model.safetensors")
    for name, tensor in sharded.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-9, msg=name)


@pytest.mark.slow
def test_sft_starts_from_the_weights_of_a_zero_checkpoint(zero_run, tmp_path: Path):
    """launch/sft.py (DDP) with init_from a ZeRO-2 run directory: the newest checkpoint's weights, gathered from
    its shards; with lr 1e-30 the first step leaves them as they were, so its checkpoint holds them."""
    from safetensors.torch import load_file

    from lsys.train.export import consolidated_weights
    from tests.test_sft_train import chat_examples, sft_command, write_jsonl

    _, zero_dir = zero_run
    data = write_jsonl(tmp_path / "chats.jsonl", chat_examples(count=40, seed=6))
    run_dir = tmp_path / "sft"
    result = run_train(sft_command(data, run_dir, f"init_from={zero_dir}", "trainer.max_steps=1", "optim.lr=1e-30"),
                       cwd=tmp_path, script="launch/sft.py")
    assert result.returncode == 0, result.stderr
    assert f"weights from {zero_dir / 'step-00000008'} (init_from)" in result.stderr
    expected = consolidated_weights(zero_dir / "step-00000008")
    saved = load_file(run_dir / "step-00000001" / "model.safetensors")
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name], tensor.to(saved[name].dtype), rtol=0, atol=1e-20, msg=name)
