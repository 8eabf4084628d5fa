"""``docs/fidelity.md`` is :func:`repro.config.fidelity.fidelity_markdown`, and every item names its sources.

Each item of :data:`repro.config.fidelity.ITEMS` carries the released lines it emulates (``source``) and the
paper passage its ``paper`` reading comes from (``passage``); the document renders both.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from repro.config.fidelity import (ITEMS, NO_PASSAGE, OWN_READING, REGENERATE, SOURCE_REPOS, Item,
                                   fidelity_markdown, item_ids)

DOC = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"
SOURCE_PART = re.compile(rf"({'|'.join(SOURCE_REPOS)}) [\w./-]+\.\w+:(\d+)(?:-(\d+))?")
QUOTE = re.compile(r'"([^"]+)"')


def _ids(items: tuple[Item, ...]) -> list[str]:
    return [item.id for item in items]


def test_the_doc_is_the_rendered_table():
    """A stale docs/fidelity.md fails with the command that rewrites it."""
    assert DOC.is_file(), f"docs/fidelity.md is missing; write it with:\n{REGENERATE}"
    assert DOC.read_text(encoding="utf-8") == fidelity_markdown(), (
        f"docs/fidelity.md differs from repro.config.fidelity.ITEMS; regenerate it with:\n{REGENERATE}")


def test_rendering_is_deterministic_and_clean():
    text = fidelity_markdown()
    assert text == fidelity_markdown()
    assert text.endswith("\n") and not text.endswith("\n\n")
    trailing = [n for n, line in enumerate(text.split("\n"), 1) if line != line.rstrip()]
    assert not trailing, f"trailing whitespace on lines {trailing}"
    assert "repro.config.fidelity.ITEMS" in text and REGENERATE in text


@pytest.mark.parametrize("item", ITEMS, ids=_ids(ITEMS))
def test_every_item_has_a_source_and_a_passage(item):
    assert item.source.strip(), f"{item.id}: no source"
    assert item.passage.strip(), f"{item.id}: no passage"


@pytest.mark.parametrize("item", ITEMS, ids=_ids(ITEMS))
def test_sources_name_released_files_and_lines(item):
    """Each '; '-separated part is '<repo> <path>:<line>[-<line>]', unless the item is repro's own reading."""
    if item.source.startswith(OWN_READING):
        return
    for part in item.source.split("; "):
        match = SOURCE_PART.fullmatch(part)
        assert match, f"{item.id}: {part!r} is not '<{'|'.join(SOURCE_REPOS)}> <path>:<line>[-<line>]'"
        first, last = int(match.group(2)), int(match.group(3) or match.group(2))
        assert 1 <= first <= last, f"{item.id}: {part!r} is not an increasing line range"


def test_the_source_pattern_rejects_malformed_parts():
    """The check above can fail: parts without a repo, a line, or with a reversed range do not pass."""
    for bad in ["src/modules.py:214", "DepthG src/modules.py", "HP src/modules.py:3", "DepthG modules:12",
                "DepthG src/modules.py:12-", "DepthG src/modules.py:214 (the loss)"]:
        assert not SOURCE_PART.fullmatch(bad), bad
    assert SOURCE_PART.fullmatch("DepthG src/train_segmentation.py:310-318")
    assert SOURCE_PART.fullmatch("DINO vision_transformer.py:174")


def test_own_readings_are_marked_in_source_or_passage():
    """Items without a released path or a paper passage say so with the agreed openings, nothing else does."""
    own = [item.id for item in ITEMS if item.source.startswith(OWN_READING)]
    paperless = [item.id for item in ITEMS if item.passage.startswith(NO_PASSAGE)]
    assert set(own) <= {f"R{n}" for n in range(17, 24)}, own
    assert set(paperless) <= {"R16"} | {f"R{n}" for n in range(17, 24)}, paperless
    for item in ITEMS:
        if not item.passage.startswith(NO_PASSAGE):
            assert QUOTE.search(item.passage), f"{item.id}: a paper passage needs a quote"


@pytest.mark.parametrize("item", ITEMS, ids=_ids(ITEMS))
def test_quotes_are_short(item):
    for quote in QUOTE.findall(item.passage):
        assert len(quote.split()) <= 25, f"{item.id}: quote of {len(quote.split())} words: {quote!r}"


def test_each_item_is_a_heading_exactly_once():
    text = DOC.read_text(encoding="utf-8") if DOC.is_file() else fidelity_markdown()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    for item in ITEMS:
        hits = [h for h in headings if re.search(rf"\b{item.id}\b", h)]
        assert hits == [f"## {item.id} — {item.component}"], f"{item.id}: headings {hits}"
    assert len([h for h in headings if re.match(r"## R\d+ ", h)]) == len(item_ids())


def test_each_section_shows_its_item():
    """Every section carries the item's passage, source parts and each setting key (or its shared fact)."""
    text = fidelity_markdown()
    sections = re.split(r"^(?=## R\d+ — )", text, flags=re.M)[1:]
    assert [s.split(" ", 2)[1] for s in sections] == item_ids()
    for item, section in zip(ITEMS, sections):
        section = section.replace("\\<", "<")  # prose escapes '<' so that '<image key>' is no HTML tag
        assert item.passage in section and item.released in section, item.id
        for part in ([item.source] if item.source.startswith(OWN_READING) else item.source.split("; ")):
            assert part in section, (item.id, part)
        for setting in item.settings:
            assert f"| `{setting.key}` |" in section, (item.id, setting.key)
        assert item.settings or item.fact in section, item.id
