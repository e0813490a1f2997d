"""launch/bench.py's report file (sections replaced in place, new ones before the hand-written notes), the
training table over paired rounds, the document mix and tile count its isolation benchmark reports, and the
ops its chunk-size benchmark times."""

from pathlib import Path

import torch

from benchmarks.harness import (
    NOTES_HEADING,
    TrainThroughput,
    chunk_size_seconds,
    document_mix,
    training_table,
    visited_tile_fraction,
    write_section,
)


def test_sections_are_replaced_in_place_and_new_ones_go_before_the_notes(tmp_path: Path):
    path = tmp_path / "perf.md"
    write_section(path, "Train", "rat 1.00x")
    path.write_text(path.read_text() + f"## {NOTES_HEADING}\n\n- written by hand\n")  # no blank line at the end
    write_section(path, "Memory", "| a | b |")
    write_section(path, "Train", "rat 0.90x")
    text = path.read_text()
    assert text == (
        "# Performance\n\nEach table is written by the command shown with it.\n\n"
        "## Train\n\nrat 0.90x\n\n## Memory\n\n| a | b |\n\n"
        f"## {NOTES_HEADING}\n\n- written by hand\n"
    )


def test_document_mix_fills_the_window_with_documents_of_at_least_8_tokens():
    ids = document_mix(4096, median=512, seed=1)
    assert ids.shape == (1, 4096) and ids[0, 0] == 0
    steps = ids[0, 1:] - ids[0, :-1]
    assert set(steps.tolist()) <= {0, 1}  # non-decreasing, one id per document
    lengths = torch.unique_consecutive(ids[0], return_counts=True)[1]
    assert (lengths[:-1] >= 8).all() and len(lengths) > 2  # only the last one is cut to fit


def test_visited_tile_fraction_counts_the_tiles_from_each_query_tiles_document_start():
    one_document = torch.zeros(1, 256, dtype=torch.long)
    assert visited_tile_fraction(one_document, tile=64) == 1.0
    # Four documents of one tile each: every query tile visits only its own diagonal tile, 4 of 10.
    tile_documents = torch.arange(256)[None] // 64
    assert visited_tile_fraction(tile_documents, tile=64) == 4 / 10
    # A document from token 32 to the end: tiles 1-3 start inside it and reach back to tile 0.
    straddling = (torch.arange(256)[None] >= 32).long()
    assert visited_tile_fraction(straddling, tile=64) == 1.0


def test_training_table_gives_medians_and_each_rounds_paired_ratio():
    def run(model: str, nproc: int, tokens_per_s: float, loss: float) -> TrainThroughput:
        return TrainThroughput(model, nproc, tokens_per_s, tokens_per_s / nproc, loss)

    rounds = [  # per round: rat 1 and 2 processes, then attn 1 and 2
        [run("rat", 1, 100, 3.0), run("rat", 2, 180, 2.9), run("attn", 1, 90, 3.1), run("attn", 2, 200, 3.0)],
        [run("rat", 1, 120, 2.0), run("rat", 2, 150, 2.8), run("attn", 1, 126, 2.1), run("attn", 2, 165, 2.7)],
        [run("rat", 1, 80, 1.0), run("rat", 2, 170, 2.7), run("attn", 1, 60, 1.1), run("attn", 2, 136, 2.6)],
    ]
    lines = training_table(rounds).splitlines()
    assert lines[0].startswith("| model | processes |") and "vs rat, per round" in lines[0]
    assert lines[2:] == [
        "| rat | 1 | 100 | 100 | 1.00x, 1.00x, 1.00x | 2.000 |",
        "| rat | 2 | 170 | 85 | 1.00x, 1.00x, 1.00x | 2.800 |",
        "| attn | 1 | 90 | 90 | 0.90x, 1.05x, 0.75x | 2.100 |",
        "| attn | 2 | 165 | 82 | 1.11x, 1.10x, 0.80x | 2.700 |",
    ]


def test_chunk_size_benchmark_times_attention_every_chunk_size_and_the_general_path_at_L1():
    timings = chunk_size_seconds(24, [1, 4], batch=1, heads=2, head_dim=8, repeats=2)
    assert list(timings) == ["attention", "rat L = 1", "rat L = 4", "rat L = 1, chunk path"]
    assert all(seconds > 0 for seconds in timings.values())
    assert "rat L = 1, chunk path" not in chunk_size_seconds(24, [4], batch=1, heads=2, head_dim=8, repeats=1)
