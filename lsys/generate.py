"""Text generation: prefill each prompt into the model's caches, then decode the batch token by token."""

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

from lsys.config import model_config
from lsys.data import Tokenizer, build_tokenizer
from lsys.models import LM, build_model
from lsys.train.checkpoint import MANIFEST, CheckpointError, config_of, latest_checkpoint, load_model_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def next_tokens(logits: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of `logits [B, vocab]`: argmax, or a sample after temperature, top-k and top-p."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first is always kept).
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: LM,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (prompts may differ in length), stopping a row at EOS (kept) or the limit."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    model.eval()
    device = model.embed.weight.device
    caches = model.init_caches(len(prompts), max(map(len, prompts)) + max_new_tokens)
    last_logits = []
    for row, prompt in enumerate(prompts):  # lengths differ: each prompt fills its own cache row
        tokens = torch.tensor([prompt], device=device)
        last_logits.append(model.prefill(tokens, [cache.row(row) for cache in caches])[0, -1])
    logits = torch.stack(last_logits)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, sampling, generator)
        for row in (~finished).nonzero()[:, 0].tolist():
            outputs[row].append(int(tokens[row]))
        if eos_id is not None:
            finished |= tokens == eos_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = model.decode(tokens[:, None], caches)[:, -1]
    return outputs


def load_for_generation(path: str | Path, device: str | torch.device = "cpu") -> tuple[LM, Tokenizer, int]:
    """Model (eval mode), tokenizer and step from a checkpoint or export folder, or a run directory (its newest)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / MANIFEST).is_file() and not path.name.startswith("step-"):  # a run directory
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path} holds no complete checkpoint (step-XXXXXXXX folder)")
        path = latest
    cfg = OmegaConf.create(config_of(path))
    model = build_model(model_config(cfg), device)
    model.load_state_dict(load_model_weights(path, model.state_dict()))
    step = json.loads((path / MANIFEST).read_text())["step"]
    log.info("loaded %s (%s, step %d)", path, cfg.model.name, step)
    return model.eval(), build_tokenizer(cfg.data.tokenizer), step


def run(cfg) -> int:
    """launch/generate.py: print each prompt with its continuation; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="[lsys] %(message)s")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        sampling = Sampling(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        model, tokenizer, _ = load_for_generation(cfg.ckpt, device)
    except (CheckpointError, ValueError) as error:
        print(f"lsys: error: {error}", file=sys.stderr)
        return 2
    prompts = [tokenizer.encode(text) for text in cfg.prompts]
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    outputs = generate(
        model, prompts, max_new_tokens=cfg.max_new_tokens, sampling=sampling, eos_id=tokenizer.eos_id, generator=generator
    )
    for text, new_ids in zip(cfg.prompts, outputs):
        ids = new_ids[:-1] if new_ids and new_ids[-1] == tokenizer.eos_id else new_ids
        print(f"--- {text!r}\n{text}{tokenizer.decode(ids)}\n")
    return 0
