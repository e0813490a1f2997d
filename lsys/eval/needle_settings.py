"""What a needle grid scores (Hydra's schema for conf/eval/needle.yaml and trainer.needle); checked by lsys.eval.needle."""

from dataclasses import dataclass, field


@dataclass
class NeedleSettings:
    """`samples` prompts for each context length (tokens) x needle depth (percent of the haystack before it)."""

    # Context lengths in tokens: prompt + answer + 4 tokens of generation room, exactly (null in training: data.seq_len).
    lengths: list[int] | None = field(default_factory=lambda: [256, 512])
    depths: list[float] = field(default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0])  # 0 = first, 100 = last
    samples: int = 4  # prompts per cell; sample i has the same needle and haystack start in every cell
    variant: str = "passkey"  # passkey | single | multikey (3 distractor keys) | multivalue (4 values, all recalled)
    scoring: str = "teacher_forced"  # teacher_forced (argmax = every answer token) | generate (greedy, string match)
    haystack: str = "stdlib"  # stdlib (lines of the standard library's .py files) | filler ("The grass is green. ...")
    seed: int = 0
