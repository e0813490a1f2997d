"""Whole models under sequence parallelism: the same losses as one process on the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsys.config import activation_plan, check_config, model_config
from lsys.hydra_app import compose_config as compose_app_config
from lsys.models import build_model
from lsys.train.engine import DDPEngine
from lsys.train.guard import DivergenceGuard
from parallel import World, init_mesh
from parallel.mesh import mesh_problems, shutdown
from tests.conftest import CONF_DIR, REPO, TINY, read_metrics, run_train
from tests.local_ranks import run_local_ranks

MODELS = ["attn_tiny", "rat_tiny", "rat_swa_tiny", "s2_tiny", "lightning_tiny"]
SEQ_LEN, MICRO_BATCH, STEPS = 64, 2, 5
RECOMPUTED = ["trainer.activation_checkpointing=full", "trainer.loss_chunk=24", "trainer.mlp_chunk=16"]


def compose_config(model: str, parallel: list[str]):
    overrides = [f"model={model}", "model.d_model=64", "model.n_layers=2", "model.ffn_dim=128",
                 f"data.seq_len={SEQ_LEN}", "optim.warmup_fraction=0", *parallel]
    if model == "rat_swa_tiny":
        overrides.append("model.mixer_options.local.window=24")  # a window shorter than a rank's piece
    return compose_app_config(CONF_DIR, "config", overrides)


# What the windows hold: "plain" text, or "answers": packed documents kept apart (segment ids) whose targets
# carry loss only in random spans (-100 elsewhere, as SFT's prompts), so that ranks and sequence pieces hold
# different numbers of counted targets.


def isolation(data: str) -> list[str]:
    return [] if data == "plain" else ["data.doc_isolation=true"]


def global_batches(dp: int, data: str) -> list[tuple[torch.Tensor, ...]]:
    """Per step: inputs and targets `[dp * B, T]`, and segment ids of random documents unless `data` is plain."""
    generator = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(STEPS):
        tokens = torch.randint(0, 257, (dp * MICRO_BATCH, SEQ_LEN + 1), generator=generator)
        inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
        # A document starts after about one token in nine: some shorter than a RAT chunk, most across ranks.
        starts = torch.rand(dp * MICRO_BATCH, SEQ_LEN, generator=generator) < 0.11
        if data == "answers":  # spans of about eight targets, each a prompt (-100) or an answer
            prompt = torch.rand(dp * MICRO_BATCH, SEQ_LEN // 8, generator=generator) < 0.6
            targets[prompt.repeat_interleave(8, dim=1)] = -100
        batches.append((inputs, targets) if data == "plain" else (inputs, targets, starts.cumsum(dim=1)))
    return batches


def train_losses(cfg, world: World, rows: slice, positions: torch.Tensor, dp: int, data: str) -> list[float]:
    """Five AdamW steps through the DDP engine on this rank's rows and token positions of fixed batches."""
    torch.manual_seed(0)
    engine = DDPEngine(build_model(model_config(cfg), activations=activation_plan(cfg.trainer)), cfg, world=world,
                       max_steps=STEPS)
    guard = DivergenceGuard(spike_factor=None, window=1, max_grad_norm=None, max_weight_growth=None)
    losses = []
    for batch in global_batches(dp, data):
        losses.append(engine.train_step([tuple(x[rows][:, positions] for x in batch)], guard).loss)
    return losses


def _parallel_worker(rank: int, world_size: int, sp: int, mode: str, data: str, out_file: str) -> None:
    world = World(rank, world_size, 0, torch.device("cpu"))
    results = {}
    for model in MODELS:
        # Split over ranks and recomputed in backward (DDP, every sequence-parallel op), against one plain process.
        parallel = [f"parallel.sp={sp}", f"parallel.sp_mode={mode}", *RECOMPUTED, *isolation(data)]
        cfg = compose_config(model, parallel)
        mesh = init_mesh(world, sp=sp, sp_mode=mode, layout=cfg.parallel.layout)
        rows = slice(mesh.dp_rank * MICRO_BATCH, (mesh.dp_rank + 1) * MICRO_BATCH)
        positions = mesh.layout.positions(mesh.sp_rank, SEQ_LEN)
        results[model] = train_losses(cfg, world, rows, positions, mesh.dp, data)
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))


def single_process_losses(dp: int, data: str) -> dict[str, list[float]]:
    world = World(0, 1, 0, torch.device("cpu"))
    results = {}
    for model in MODELS:
        init_mesh(world)
        cfg = compose_config(model, isolation(data))
        results[model] = train_losses(cfg, world, slice(None), torch.arange(SEQ_LEN), dp, data)
    shutdown()
    return results


@pytest.mark.slow
@pytest.mark.parametrize(
    "world_size, sp, data", [(2, 2, "plain"), (4, 2, "plain"), (2, 2, "answers"), (2, 1, "answers")],
    ids=["dp1-sp2", "dp2-sp2", "dp1-sp2-answers", "dp2-sp1-answers"],
)
def test_sequence_parallel_training_matches_one_process(world_size: int, sp: int, data: str, tmp_path: Path):
    """With "answers", windows of packed documents (segment ids) kept apart by every op and its sp path, and a loss
    over the counted targets of the whole step, however unevenly they fall on the ranks and pieces."""
    out_file = tmp_path / "losses.json"
    run_local_ranks(_parallel_worker, world_size, sp, "ring", data, str(out_file))
    parallel = json.loads(out_file.read_text())
    expected = single_process_losses(dp=world_size // sp, data=data)
    if data != "plain":  # the documents are kept apart: other losses than the same windows packed plainly
        plain = single_process_losses(dp=world_size // sp, data="plain")
        assert all(abs(a - b) > 1e-4 for model in MODELS for a, b in zip(expected[model][1:], plain[model][1:]))
    for model in MODELS:
        assert len(set(expected[model])) == STEPS  # the loss moves, so agreement is informative
        # fp32, different summation orders across ranks: agreement to ~1e-5 relative over five steps.
        torch.testing.assert_close(parallel[model], expected[model], rtol=2e-5, atol=0, msg=model)


def files_data(corpus: Path) -> list[str]:
    return ["data=files", f"data.path={corpus}"]


@pytest.mark.slow
def test_torchrun_trains_dp2_by_sp2(corpus: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_train(
        [*files_data(corpus), *TINY, "model=rat_swa_tiny", "parallel.sp=2", "trainer.max_steps=3", f"run_dir={run_dir}"],
        cwd=tmp_path, nproc=4,
    )
    assert result.returncode == 0, result.stderr
    assert "dp 2 x sp 2, ring, zigzag layout" in result.stderr
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] < records[0]["loss"]
    assert records[0]["tokens_seen"] == 2 * 2 * 64  # two dp replicas of 2 windows of 64 tokens
    # A model trained with sp=2 generates in one process: checkpoints hold whole weights.
    generated = subprocess.run(
        [sys.executable, str(REPO / "launch/generate.py"), f"ckpt={run_dir}", "max_new_tokens=8", "temperature=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert generated.returncode == 0, generated.stderr
    assert "--- 'def '" in generated.stdout


@pytest.mark.slow
def test_resume_is_exact_with_sequence_parallelism(corpus: Path, tmp_path: Path):
    """A session resumed from step 3 of a 6-step sp=2 run (2 ranks, one dp replica) retraces steps 4 to 6 bitwise."""
    common = [*files_data(corpus), *TINY, "model=rat_tiny", "parallel.sp=2", "trainer.max_steps=6",
              "trainer.checkpoint_every=3", "trainer.eval_every=3"]
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = run_train([*common, f"run_dir={straight_dir}"], cwd=tmp_path, nproc=2)
    assert straight.returncode == 0, straight.stderr
    resumed = run_train([*common, f"run_dir={resumed_dir}", f"resume={straight_dir / 'step-00000003'}"],
                        cwd=tmp_path, nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    expected, got = read_metrics(straight_dir), read_metrics(resumed_dir)
    assert [r["step"] for r in got] == [4, 5, 6]
    for key in ("loss", "val_loss", "grad_norm"):
        assert [r.get(key) for r in got] == [r.get(key) for r in expected[3:]], key


SP_BAD_INPUTS = {
    "length not divisible by 2 sp": (2, ["model=attn_tiny", "data.seq_len=66", "parallel.sp=2"],
                                     "data.seq_len (66) must be divisible by 4 (sp=2 x 2 for the zigzag layout)"),
    "length not divisible by chunk x pieces": (2, ["data.seq_len=96", "parallel.sp=2"],
                                               "must be divisible by 16 x 4 = 64: mixer 'rat'"),
    "heads not divisible by the Ulysses degree": (2, ["model=attn_tiny", "model.n_heads=2", "model.d_model=64",
                                                      "parallel.sp=4", "parallel.sp_mode=ulysses", "data.seq_len=64"],
                                                  "model.n_heads (2) is not divisible by the Ulysses degree (4)"),
    "world size not divisible by sp": (2, ["model=attn_tiny", "parallel.sp=3", "data.seq_len=60"],
                                       "parallel.sp (3) must divide the world size (2)"),
}


@pytest.mark.parametrize("case", sorted(SP_BAD_INPUTS))
def test_sequence_parallel_bad_input_is_one_clear_problem(case: str):
    """The checks launch/train.py runs on every rank before anything is written (that such a problem ends a
    torchrun job in one line with exit code 2: test_run_safety)."""
    world_size, overrides, expected = SP_BAD_INPUTS[case]
    cfg = compose_app_config(CONF_DIR, "config", overrides)
    par = cfg.parallel
    problems = check_config(cfg) + mesh_problems(par.sp, par.sp_mode, par.ulysses, world_size)
    assert len([problem for problem in problems if expected in problem]) == 1, problems
