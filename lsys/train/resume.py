"""What a resumed session may change: its config against the one its checkpoint was trained with.

Settings sort into three kinds:
- free: how the run is watched and how long it goes (log, eval and checkpoint cadence,
  `trainer.max_steps`, ...) and what a step keeps for backward: applied, and logged;
- optimizer (`optim.*`): applied to the restored optimizer and schedule only with
  `resume_overrides=apply`, refused otherwise;
- everything else (model, data, seed, batch and world layout, ...) changes what the run
  trains: refused. A setting new to lsys since the checkpoint counts as changed too, unless
  it holds the value (ADDED) that does what lsys did before the setting existed.
"""

from dataclasses import dataclass, field

# Dotted keys (or prefixes) a session may change on resume.
FREE = (
    "run_name", "run_dir", "resume", "resume_overrides", "resume_weights_only", "parallel.backend", "parallel.timeout_s",
    "trainer.max_steps", "trainer.stop_after_steps", "trainer.log_every", "trainer.eval_every",
    "trainer.eval_batches", "trainer.eval_needle_every", "trainer.needle", "trainer.checkpoint_every",
    "trainer.keep_checkpoints", "trainer.progress_bar", "trainer.tensorboard", "trainer.spike_factor",
    "trainer.spike_window", "trainer.max_grad_norm_abort", "trainer.max_weight_growth", "trainer.skip_memory_check",
    "trainer.activation_checkpointing", "trainer.ac_every", "trainer.loss_chunk", "trainer.mlp_chunk",
    "trainer.offload_activations", "trainer.peak_tflops",
    # The same math by another implementation (a GPU whose Triton kernels fail their self-check goes on in torch).
    "model.kernel_backend",
)
OPTIMIZER = ("optim",)
# Settings added since earlier checkpoints were saved, with the value that trains as lsys did before them.
ADDED = {
    "data.doc_isolation": False, "data.rope_restart": None, "init_from": None, "data.format": "text",
    "data.messages_field": "messages", "data.prompt_field": "prompt", "data.response_field": "response",
    "data.packing": True, "data.truncation": "error", "data.chat_template": None, "data.num_documents": 20000,
    "data.short_keys": 0.0, "trainer.peak_tflops": None, "model.kernel_backend": "auto",
}
RESUME_OVERRIDES = ("refuse", "apply")


@dataclass
class ConfigChanges:
    free: list[str] = field(default_factory=list)  # one "key: old -> new" line each
    optimizer: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def flatten(config: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _matches(key: str, rules: tuple[str, ...]) -> bool:
    return any(key == rule or key.startswith(f"{rule}.") for rule in rules)


# How a run is spread over ranks: free when a session starts from a checkpoint's weights alone.
ENGINE = ("parallel.engine", "parallel.zero_stage", "parallel.offload", "parallel.deepspeed_config", "parallel.sp",
          "parallel.sp_mode", "parallel.ulysses", "parallel.layout")


def compare_configs(saved: dict, current: dict, *, engine_may_change: bool = False) -> ConfigChanges:
    """The settings that differ between the resolved config a checkpoint recorded and this session's."""
    free = FREE + (ENGINE if engine_may_change else ())
    old, new = flatten(saved), flatten(current)
    changes = ConfigChanges()
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, ADDED.get(key, "(unset)")), new.get(key, "(unset)")
        if before == after:
            continue
        line = f"{key}: {before} -> {after}"
        if _matches(key, free):
            changes.free.append(line)
        elif _matches(key, OPTIMIZER):
            changes.optimizer.append(line)
        else:
            changes.refused.append(line)
    return changes
