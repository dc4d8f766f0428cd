"""The scale benchmark's synthetic catalog: deterministic, sliceable, and importable."""

from __future__ import annotations

import itertools

from server.application.commands.import_catalog import _problem, catalog_record_from_json
from server.devtools.synthetic_catalog import CHUNK, KINDS, SyntheticCatalog


def test_a_slice_is_the_same_records_as_the_whole_stream() -> None:
    catalog = SyntheticCatalog(CHUNK + 50, seed=3)
    whole = list(catalog)
    assert len(whole) == CHUNK + 50
    assert list(catalog.records(CHUNK - 5, CHUNK + 5)) == whole[CHUNK - 5 : CHUNK + 5]
    assert list(SyntheticCatalog(CHUNK + 50, seed=3).records(0, 10)) == whole[:10]
    assert list(SyntheticCatalog(CHUNK + 50, seed=4).records(0, 10)) != whole[:10]
    assert len({r["source_id"] for r in whole}) == len(whole)


def test_records_are_valid_catalog_records_shaped_like_real_ones() -> None:
    records = list(itertools.islice(SyntheticCatalog(3000), 3000))
    assert all(_problem(catalog_record_from_json(r)) == "" for r in records)
    descriptions = sorted(len(r["description"]) for r in records)
    median = descriptions[len(descriptions) // 2]
    assert 250 <= median <= 800  # the Civitai sample's median is about 460 characters
    assert max(descriptions) <= 2000
    assert sum(1 for r in records if r["tags"][0] in KINDS) > len(records) // 2
    assert sum(1 for r in records if r["trigger_words"]) > len(records) // 2
    words = {w for r in records for w in r["description"].split()}
    assert len(words) > 10_000  # a vocabulary that grows with the catalog, not a fixed list
