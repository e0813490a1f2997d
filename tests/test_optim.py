"""The learning-rate schedules, read back from a real AdamW stepped by the scheduler build_scheduler makes."""

import pytest
import torch
from omegaconf import OmegaConf

from lsys.config import check_config
from lsys.train.config import OptimConfig
from lsys.train.optim import build_optimizer, build_scheduler
from tests.conftest import compose_config

PEAK = 3e-3


def lrs_over(max_steps: int, **settings) -> list[float]:
    """The lr of every optimizer step 0..max_steps-1, as the trainer steps the scheduler once per step."""
    cfg = OmegaConf.structured(OptimConfig(lr=PEAK, **settings))
    optimizer = build_optimizer(torch.nn.Linear(4, 4), cfg)
    scheduler = build_scheduler(optimizer, cfg, max_steps)
    lrs = []
    for _ in range(max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_wsd_warms_up_holds_the_peak_then_decays_linearly_to_the_minimum():
    lrs = lrs_over(100, schedule="wsd", warmup_fraction=0.1, decay_fraction=0.2, min_lr_ratio=0.1)
    assert lrs[:10] == pytest.approx([PEAK * (step + 1) / 10 for step in range(10)])
    assert lrs[10:80] == pytest.approx([PEAK] * 70)
    # Steps 80..99 go down a line from the peak at step 80 towards 0.1 x peak at step 100.
    assert lrs[80:] == pytest.approx([PEAK * (1 - 0.9 * (step - 80) / 20) for step in range(80, 100)])
    assert lrs[99] > 0.1 * PEAK


def test_cosine_decays_from_the_peak_after_warmup():
    lrs = lrs_over(100, schedule="cosine", warmup_fraction=0.1, min_lr_ratio=0.1)
    assert lrs[9] == pytest.approx(PEAK)
    assert lrs[55] == pytest.approx(PEAK * 0.55)  # halfway through the cosine: the mean of peak and minimum
    assert all(later < earlier for earlier, later in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.schedule=linear"], "optim.schedule must be one of cosine, wsd, got 'linear'"),
        (["optim.schedule=wsd", "optim.decay_fraction=0"], "optim.decay_fraction must be in (0, 1 - warmup_fraction]"),
        (["optim.schedule=wsd", "optim.warmup_fraction=0.5", "optim.decay_fraction=0.6"],
         "optim.decay_fraction must be in (0, 1 - warmup_fraction]"),
    ],
)
def test_a_bad_schedule_is_a_config_problem(overrides: list[str], message: str):
    problems = check_config(compose_config(overrides))
    assert any(message in problem for problem in problems), problems


def test_a_wsd_run_resumed_with_more_steps_in_its_stable_phase_stays_at_the_peak():
    """The scheduler is rebuilt from the new max_steps and takes the saved position (as a resume does)."""
    cfg = OmegaConf.structured(OptimConfig(lr=PEAK, schedule="wsd", warmup_fraction=0.0, decay_fraction=0.2))
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, max_steps=100)
    for _ in range(70):
        optimizer.step()
        scheduler.step()
    saved = scheduler.state_dict()

    longer = build_scheduler(build_optimizer(model, cfg), cfg, max_steps=200)
    longer.load_state_dict(saved)
    lrs = []
    for _ in range(130):
        lrs.append(longer.get_last_lr()[0])
        longer.step()
    assert lrs[:90] == pytest.approx([PEAK] * 90)  # steps 70..159: the stable phase of 200 steps
    assert lrs[-1] == pytest.approx(PEAK * (1 - 0.9 * 39 / 40))
