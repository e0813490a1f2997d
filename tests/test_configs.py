"""Every config in conf/ composes, validates and builds: tiny models run a step, large ones build on meta."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lsys.config import check_config, model_config
from lsys.hydra_app import CompositionError
from lsys.models import build_model
from tests.conftest import CONF_DIR, REPO, TINY, compose_config, read_metrics, run_train

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
TINY_MODELS = [m for m in MODELS if m.endswith("_tiny")]
LARGE_MODELS = [m for m in MODELS if not m.endswith("_tiny")]


# The app whose config composes each group's options: the training config, but for eval options, each its own app's.
EVAL_APPS = {"needle": "eval_needle", "sft": "eval_sft"}
APPS = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
# What each app needs on its command line besides the defaults (its ??? settings).
APP_OVERRIDES = {"eval_needle": ["ckpt=runs/x"], "eval_sft": ["ckpt=runs/x", "data.path=x"], "export": ["ckpt=x", "out=y"],
                 "generate": ["ckpt=runs/x"], "sft": ["data=qa"]}


def test_every_group_option_composes_and_validates(corpus: Path, tokenizer_file: Path):
    groups = [p.name for p in CONF_DIR.iterdir() if p.is_dir()]
    checked = 0
    for group in groups:
        for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
            overrides = [f"{group}={option}"]
            if group == "data" and option in ("files", "hub", "sft"):
                overrides.append(f"data.path={corpus}")
            if group == "experiment":
                overrides.append(f"data.tokenizer.path={tokenizer_file}")
            if group == "eval":
                app = EVAL_APPS[option]
                cfg = compose_config([*overrides, *APP_OVERRIDES[app]], config_name=app)
                assert dataclasses.is_dataclass(OmegaConf.get_type(cfg.eval)), option
            else:
                cfg = compose_config(overrides)
                OmegaConf.resolve(cfg)
                assert check_config(cfg) == [], (group, option)
            checked += 1
    assert checked >= len(MODELS) + 4


@pytest.mark.parametrize("app", APPS)
def test_every_app_and_group_is_typed_by_a_schema(app: str):
    """lsys/schema.py types each app's config and every config group in it, so Hydra checks each key and value."""
    cfg = compose_config(APP_OVERRIDES.get(app, []), config_name=app)
    assert dataclasses.is_dataclass(OmegaConf.get_type(cfg)), app
    groups = [key for key in cfg if (CONF_DIR / key).is_dir()]
    assert groups or app in ("export", "generate"), app  # the two apps without groups
    for group in groups:
        assert dataclasses.is_dataclass(OmegaConf.get_type(cfg[group])), (app, group)


@pytest.mark.parametrize(
    "app, override, key",
    [
        ("config", "trainer.max_stepz=3", "trainer.max_stepz"),
        ("config", "+trainer.max_stepz=3", "trainer.max_stepz"),
        ("config", "+data.pathh=x", "data.pathh"),
        ("config", "+data.tokenizer.eos_tokn=x", "data.tokenizer.eos_tokn"),
        ("sft", "+optim.betass=[0.9,0.9]", "optim.betass"),
        ("plan", "+plan.gpu_mem=40", "plan.gpu_mem"),
        ("eval_needle", "+eval.depth=[10]", "eval.depth"),
        ("eval_sft", "+eval.sample=3", "eval.sample"),
        ("generate", "+top_kk=3", "top_kk"),
    ],
)
def test_an_unknown_key_is_refused_in_one_line_that_names_it(app: str, override: str, key: str):
    with pytest.raises(CompositionError) as error:
        compose_config([*APP_OVERRIDES.get(app, []), override], config_name=app)
    assert str(error.value).startswith(f"unknown config key {key}: ") and "\n" not in str(error.value)
    assert "did you mean" in str(error.value)



@pytest.fixture
def tokenizer_file(tmp_path: Path, corpus: Path) -> Path:
    """A small BPE tokenizers JSON with a </s> token, as the experiments expect."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train([str(p) for p in corpus.iterdir()], trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"]))
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_experiments_build_on_meta(name: str, tokenizer_file: Path):
    cfg = compose_config([f"experiment={name}", f"data.tokenizer.path={tokenizer_file}"])
    assert check_config(cfg) == []
    model = build_model(model_config(cfg), device="meta")
    print(f"{name}: {model.num_params():,} parameters")
    assert model.num_params() > 0


@pytest.mark.parametrize("name", LARGE_MODELS)
def test_large_models_build_on_meta(name: str):
    cfg = compose_config([f"model={name}", "data.seq_len=4096"])
    model = build_model(model_config(cfg), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert 1.2e9 < model.num_params() < 1.4e9


def test_launch_model_info_prints_a_large_models_size():
    cfg = compose_config(["model=lightning_1b", "data.seq_len=4096"])
    parameters = build_model(model_config(cfg), device="meta").num_params()
    printed = subprocess.run(
        [sys.executable, str(REPO / "launch/model_info.py"), "model=lightning_1b", "data.seq_len=4096"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert f"model lightning_1b: {parameters:,} parameters" in printed


def test_rat_1b_has_the_papers_parameter_count():
    model = build_model(model_config(compose_config(["model=rat_1b"])), device="meta")
    # 24 x (in-proj 2048 x (3*2048 + 2*2*128) + gate bias + out 2048^2 + FFN 2 x 2048 x 8192 + 2 norms)
    # + final norm + tied embedding 32000 x 2048.
    per_layer = 2048 * (3 * 2048 + 2 * 2 * 128) + 2048 + 2048 * 2048 + 2 * 2048 * 8192 + 2 * 2048
    assert model.num_params() == 24 * per_layer + 2048 + 32000 * 2048
    assert round(model.num_params() / 1e9, 2) == 1.30


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_models_train_through_launch_train(name: str, corpus: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_train(
        [f"model={name}", "data=files", f"data.path={corpus}", f"run_dir={run_dir}", "trainer.max_steps=3",
         "trainer.tensorboard=true", *TINY],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert (run_dir / "step-00000003" / "COMPLETE").is_file()
    assert OmegaConf.load(run_dir / "config.yaml").model.name == name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
