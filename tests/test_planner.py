"""The memory planner: its predictions against measured CPU steps, its search, and its bad input."""

import subprocess
import sys
from dataclasses import replace

import pytest

from benchmarks.step_memory import measure_in_fresh_process
from lsys.config import ConfigError
from lsys.models import ActivationPlan, ModelConfig, build_model
from lsys.train.memory import training_state
from lsys.train.plan_command import plan_setup
from lsys.train.planner import Setup, longest_sequence, plan, sequence_unit
from tests.conftest import REPO, compose_config

SMALL = ModelConfig(name="rat_small", vocab_size=4096, d_model=64, n_layers=3, n_heads=4, ffn_dim=256, layers=["rat"],
                    mixer_options={"rat": {"chunk_size": 16}})


def compose_plan(overrides: list[str]):
    return compose_config(overrides, config_name="plan")


@pytest.mark.slow
@pytest.mark.parametrize("activations", [ActivationPlan(), ActivationPlan("full", loss_chunk=256)],
                         ids=["plain", "recomputed-tiled-loss"])
def test_planned_step_peak_is_within_15_percent_of_the_measured_one(activations: ActivationPlan):
    """A fresh process's step peak (benchmarks/step_memory.py) against the planner's activations plus gradients."""
    measured = measure_in_fresh_process(SMALL, activations, seq_len=2048, micro_batch=2)["step_peak"]
    result = plan(Setup(model=SMALL, seq_len=2048, micro_batch=2, world_size=1, activations=activations,
                        precision="fp32"))
    predicted = result.activations + result.state.gradients
    assert predicted == pytest.approx(measured, rel=0.15), (predicted / 2**20, measured / 2**20)


def test_training_state_is_the_memory_formulas_for_every_stage():
    parameters = build_model(replace(SMALL, vocab_size=64), device="meta").num_params()
    cache = {}
    for engine, stage, offload in [("ddp", 0, "none"), ("deepspeed", 1, "none"), ("deepspeed", 2, "optimizer"),
                                   ("deepspeed", 3, "none"), ("deepspeed", 3, "optimizer_and_params")]:
        setup = Setup(model=replace(SMALL, vocab_size=64), seq_len=64, micro_batch=1, world_size=4, engine=engine,
                      zero_stage=stage, offload=offload)
        result = plan(setup, cache)
        assert result.state == training_state(parameters, engine=engine, zero_stage=stage, offload=offload,
                                              world_size=4, bf16=True)
        assert result.peak > result.state.device_total  # activations and buffers come on top


def test_recomputation_and_tiled_loss_shrink_the_plan_and_sequence_parallelism_adds_exchange():
    base = Setup(model=SMALL, seq_len=1024, micro_batch=1, world_size=1, precision="fp32")
    plain = plan(base)
    lean = plan(replace(base, activations=ActivationPlan("full", loss_chunk=256)))
    assert lean.activations < plain.activations / 2
    split = plan(replace(base, world_size=2, sp=2))
    assert split.buffers["sequence-parallel exchange"] > 0 and split.sent["rat (rat_sp)"] > 0
    assert split.activations < plain.activations  # half the tokens per rank


def test_longest_sequence_is_the_length_whose_plan_just_fits():
    # Attention runs as one SDPA call per layer whatever T: a few ops to trace per length.
    model = replace(SMALL, name="attention_small", layers=["attention"], mixer_options={})
    setup = Setup(model=model, seq_len=1024, micro_batch=1, world_size=1, precision="fp32",
                  activations=ActivationPlan("full", loss_chunk=1024))
    cache = {}
    unit = sequence_unit(setup)
    target = 24 * unit  # beyond the traced lengths: the search runs on the planner's extension
    budget = plan(replace(setup, seq_len=target), cache).peak
    length, best = longest_sequence(setup, budget, cache)
    assert length == target and best.peak == budget
    assert plan(replace(setup, seq_len=target + unit), cache).peak > budget
    assert longest_sequence(setup, 1.0, cache) == (0, None)  # not even one unit fits in one byte


# Each bad planner setting is one problem that names it; end to end, one line and exit code 2.
BAD_PLANS = {
    "mesh does not divide the world": (["parallel.sp=4", "plan.world_size=6"], "parallel.sp (4) must divide the world size (6)"),
    "unknown mode": (["plan.mode=fastest"], "plan.mode must be one of peak, max_seq_len"),
    "loss chunk not positive": (["trainer.loss_chunk=0"], "trainer.loss_chunk must be a positive number of tokens"),
    "unknown checkpointing": (["trainer.activation_checkpointing=blocks"], "must be one of none, full, mixer, every_n"),
    "offload on a CPU plan": (["plan.device=cpu", "trainer.activation_checkpointing=full",
                               "trainer.offload_activations=true"], "needs plan.device=gpu"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_each_bad_plan_setting_is_one_problem_that_names_it(case: str):
    overrides, expected = BAD_PLANS[case]
    with pytest.raises(ConfigError) as raised:
        plan_setup(compose_plan(overrides))
    assert len([problem for problem in raised.value.problems if expected in problem]) == 1, raised.value.problems


@pytest.mark.slow
def test_plan_command_prints_the_plan_and_refuses_a_bad_mesh_in_one_line():
    command = [sys.executable, str(REPO / "launch/plan.py"), "model=rat_tiny", "data.seq_len=512", "parallel.sp=2",
               "plan.world_size=4", "trainer.activation_checkpointing=full", "trainer.loss_chunk=128"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "peak" in result.stdout and "kept activations: rat (4 layers)" in result.stdout
    assert "gradient sync" in result.stdout  # 4 ranks: dp 2
    bad = subprocess.run([*command[:-3], "plan.world_size=3"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert lines == ["lsys: config error: parallel.sp (2) must divide the world size (3)"], bad.stderr
