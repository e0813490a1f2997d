"""launch/bench.py's report file: sections replaced in place, new ones before the hand-written notes."""

from pathlib import Path

from lsys.bench import NOTES_HEADING, write_section


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
