"""Writes compress with a per-project zstd dictionary they train themselves; reads never depend on luck."""

from __future__ import annotations

import random
from typing import Any

import pytest
from django.db import transaction

from snapshots_app import store
from snapshots_app.canonical import dumps
from snapshots_app.models import CompressionDictionary, StateNode, Version
from snapshots_app.selectors import version_diff, version_state
from snapshots_app.services import snapshot_record
from tests.conftest import clear_cache

WORDS = [f"w{n}{'ab' * (n % 4)}" for n in range(600)]


def documents(count: int, *, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    return {
        "documents": [
            {"id": index, "title": " ".join(rng.choices(WORDS, k=6)), "text": " ".join(rng.choices(WORDS, k=260))}
            for index in range(count)
        ],
        "step": seed,
    }


def reread(version: Version) -> Any:
    """The version's state from the database alone: no cached node, text or decompressor."""
    clear_cache()
    store._local.__dict__.pop("dict_decompressors", None)
    return version_state(Version.objects.select_related("session").get(pk=version.pk))


def test_a_large_write_trains_a_dictionary_and_reads_back_exactly(session):
    state = documents(700)
    version = snapshot_record(session=session, state=state)

    assert CompressionDictionary.objects.filter(project=session.project).count() == 1
    assert StateNode.objects.filter(project=session.project, codec=store.CODEC_ZSTD_DICT).count() > 500
    assert reread(version) == state
    assert store.read_canonical(version, use_cache=False) == dumps(state)


def test_small_writes_train_one_once_enough_nodes_were_written(session, monkeypatch):
    monkeypatch.setattr(store, "DICTIONARY_TRAIN_MIN_NODES", 60)
    monkeypatch.setattr(store, "DICTIONARY_TRAIN_MIN_BYTES", 60_000)
    versions = [snapshot_record(session=session, state=documents(12, seed=seed)) for seed in range(8)]

    assert CompressionDictionary.objects.filter(project=session.project).count() == 1
    assert StateNode.objects.filter(project=session.project, codec=store.CODEC_ZSTD_DICT).exists()
    for seed, version in enumerate(versions):
        assert reread(version) == documents(12, seed=seed)
    diff = version_diff(versions[0], versions[-1])
    assert {"op": "replace", "path": "/step", "value": 7} in diff.patch


def test_a_rolled_back_write_leaves_no_dictionary_for_later_writes(session):
    with pytest.raises(RuntimeError), transaction.atomic():
        snapshot_record(session=session, state=documents(700))
        raise RuntimeError("the caller's transaction fails after the write")
    assert not CompressionDictionary.objects.filter(project=session.project).exists()

    # The next write must not compress with the dictionary that vanished with the rollback.
    state = documents(700, seed=2)
    version = snapshot_record(session=session, state=state)
    assert reread(version) == state


def test_a_few_huge_nodes_are_stored_without_a_dictionary(session):
    # Far too few nodes to learn from, but more bytes than the sample buffer holds.
    state = {f"blob{n}": " ".join(random.Random(n).choices(WORDS, k=400_000)) for n in range(3)}
    version = snapshot_record(session=session, state=state)
    assert not CompressionDictionary.objects.filter(project=session.project).exists()
    assert reread(version) == state
