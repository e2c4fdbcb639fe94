"""naming: names parse back what they say, internal names always fit, and bad names are refused."""

from __future__ import annotations

import os

import pytest

from ckptmgr.naming import (
    NAME_MAX,
    check_checkpoint_name,
    checkpoint_name,
    internal_name,
    looks_like_checkpoint,
    parse_name,
    record_name,
    split_internal,
    stem,
    versioned,
)


@pytest.mark.parametrize("name, step, epoch, last", [
    ("epoch=3-step=1200.ckpt", 1200, 3, False), ("step=5.ckpt", 5, None, False), ("last.ckpt", None, None, True),
    ("last-v2.ckpt", None, None, True), ("model-epoch=1-step=9-v1.ckpt", 9, 1, False), ("notes.txt", None, None, False),
])
def test_parse_name(name, step, epoch, last):
    parsed = parse_name(name)
    assert (parsed.step, parsed.epoch, parsed.is_last) == (step, epoch, last)


def test_build_and_version_names():
    assert checkpoint_name(1200, 3) == "epoch=3-step=1200.ckpt"
    assert checkpoint_name(7, None) == "step=7.ckpt"
    assert versioned("epoch=0-step=5.ckpt", 2) == "epoch=0-step=5-v2.ckpt"


@pytest.mark.parametrize("length", [1, 100, 233, 234, 255])
def test_internal_names_fit_and_split_back(length):
    name = "é" * (length // 2) + "x" * (length % 2)  # multi-byte characters: the limit is in bytes
    token = "0123abcd"
    for internal in (internal_name(name, token), record_name(name, token) + ".tmp"):
        assert len(os.fsencode(internal)) <= NAME_MAX
    assert split_internal(record_name(name, token)) == (stem(name), token)
    assert split_internal(internal_name(name, token)) == (stem(name), token)


def test_long_names_get_distinct_stems():
    a, b = "a" * 250 + "1", "a" * 250 + "2"
    assert stem(a) != stem(b) and stem("short.ckpt") == "short.ckpt"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", ".ckptmgr", "x\x00y", "z" * 256])
def test_names_that_cannot_be_checkpoints(name):
    assert check_checkpoint_name(name) is not None


@pytest.mark.parametrize("name, expected", [("epoch=0-step=5.ckpt", True), ("model.pt", True), ("last", True),
                                            ("notes.txt", False), (".hidden.ckpt", False)])
def test_looks_like_checkpoint(name, expected):
    assert looks_like_checkpoint(name) is expected


def test_split_refuses_what_is_not_internal():
    assert split_internal("epoch=0-step=5.ckpt") is None and split_internal("x.notahex1.json") is None
