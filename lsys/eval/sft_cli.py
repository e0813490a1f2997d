"""launch/eval_sft.py: score a checkpoint on held-out SFT examples, write the report, print the scores.

Under torchrun every rank takes part: the loss's windows are shared by the dp replicas and each
sequence by the `parallel.sp` ranks; generation (parallel.sp=1) shares the examples over the ranks.
Global rank 0 writes `answers.jsonl` and `summary.json` and prints the scores.
"""

import json
import logging
import sys
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from lsys.data import DataConfig, chat_template_of, load_examples
from lsys.data.sft import read_conversation, windows_of_examples
from lsys.eval.cli import run_dir_of
from lsys.eval.needle import EvalError
from lsys.eval.sft import AnswerResult, answer_scores
from lsys.generate import load_for_generation
from lsys.train.checkpoint import CheckpointError, step_dir_name
from lsys.train.engine import mean_loss, summed_loss
from parallel import barrier, init_distributed, init_mesh, shutdown
from parallel.mesh import mesh_problems

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> int:
    """Evaluate and report (default folder <run dir>/eval/sft-step-XXXXXXXX); the exit code (2: bad input)."""
    logging.basicConfig(level=logging.INFO, format="[lsys] %(message)s")
    par = cfg.parallel
    world = init_distributed(par.backend, par.timeout_s)
    try:
        problems = mesh_problems(par.sp, par.sp_mode, par.ulysses, world.world_size)
        if par.sp > 1 and cfg.eval.samples:
            problems.append("generation runs without sequence parallelism: with parallel.sp > 1 set eval.samples=0 "
                            "(the loss only), or generate with parallel.sp=1")
        if problems:
            raise EvalError("; ".join(problems))
        mesh = init_mesh(world, sp=par.sp, sp_mode=par.sp_mode, ulysses=par.ulysses, layout=par.layout)
        device = world.device if cfg.device == "auto" else torch.device(cfg.device)
        model, tokenizer, step = load_for_generation(cfg.ckpt, device)
        data = DataConfig.from_attrs(cfg.data)
        if not data.is_sft:
            raise EvalError(f"data.format is '{data.format}': eval_sft scores chat or prompt/response examples")
        seq_len = cfg.data.seq_len
        template = chat_template_of(cfg.data, tokenizer)
        _, held_out = load_examples(data, seq_len=seq_len)
        if held_out is None:
            raise EvalError(f"data '{data.name}' has no held-out split: set data.val_fraction, data.val_path or "
                            "data.val_split")
        if cfg.eval.loss_examples is not None:
            held_out = held_out.select(range(min(cfg.eval.loss_examples, len(held_out))))
        windows = windows_of_examples(
            held_out, cfg=data, template=template, tokenizer=tokenizer, seq_len=seq_len, split="validation"
        )
        fields = list(data.example_fields.values())
        # Every window once: dp replica r takes windows r, r + dp, ...; its sp ranks their positions of each.
        positions = mesh.layout.positions(mesh.sp_rank, seq_len) if mesh.sp > 1 else slice(None)
        mine = torch.arange(mesh.dp_rank, windows.count, mesh.dp)
        batches = (
            tuple(part[:, positions] for part in windows.batch(ids)) for ids in mine.split(cfg.micro_batch_size)
        )
        model.eval()
        loss = mean_loss(
            lambda batch: summed_loss(model, batch, device, nullcontext(), data.restarts_positions), batches, device
        )
        conversations = [
            read_conversation([row[field] for field in fields], format=data.format, fields=fields,
                              where=f"data set '{data.name}' (validation) example {index}")
            for index, row in enumerate(held_out.select(range(min(cfg.eval.samples, len(held_out)))))
        ]
        results = answer_scores(
            model, tokenizer, template, conversations[world.rank :: world.world_size],
            max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
            progress=cfg.progress_bar and world.is_main,
        )
        results = gathered(results, world.rank, world.world_size)
        barrier()  # leave together: a rank tearing its group down while a peer still talks aborts
    except (CheckpointError, ValueError) as error:  # EvalError and DataError are ValueErrors
        if world.is_main:
            print(f"lsys: error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if not world.is_main:
        return 0
    summary = {
        "checkpoint": str(cfg.ckpt), "step": step, "model": model.cfg.name, "data": data.name,
        "loss_examples": len(held_out), "answer_loss": loss, "answered": len(results),
        "exact_match": sum(r.exact_match for r in results) / len(results) if results else None,
        "rouge_l": sum(r.rouge_l for r in results) / len(results) if results else None,
    }
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir_of(Path(cfg.ckpt)) / "eval" / f"sft-{step_dir_name(step)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "answers.jsonl", "w") as file:
        for result in results:
            file.write(json.dumps(asdict(result)) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info("wrote %s", out_dir)
    print(f"held-out answer loss {loss:.4f} nats per answer token ({len(held_out)} examples)")
    if results:
        print(f"exact match {summary['exact_match']:.4f}, ROUGE-L {summary['rouge_l']:.4f} ({len(results)} answered)")
    return 0


def gathered(results: list[AnswerResult], rank: int, world_size: int) -> list[AnswerResult]:
    """Every rank's results, in example order (rank r answered examples r, r + world_size, ...)."""
    if world_size == 1:
        return results
    shares: list[list[AnswerResult]] = [[] for _ in range(world_size)]
    dist.all_gather_object(shares, [(rank + world_size * i, r) for i, r in enumerate(results)])
    ordered = sorted((index, result) for share in shares for index, result in share)
    return [AnswerResult(**{**asdict(result), "index": index}) for index, result in ordered]
