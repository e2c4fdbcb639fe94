"""The manifest parser is strict: every malformed input is a ManifestError, never a default."""

from __future__ import annotations

import json
import os

import pytest

from ckptmgr.errors import ManifestError
from ckptmgr.manifest import MANIFEST_NAME, FileEntry, Manifest, parse_manifest
from tests.helpers.files import resigned

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HASH = "ab" * 16


def sample(**overrides) -> Manifest:
    """A directory-shaped manifest (paths inside the directory)."""
    fields = dict(name="epoch=0-step=5.ckpt", step=5, epoch=0, sequence=1, kind="torch", load_path="checkpoint.pt",
                  files=(FileEntry(path="checkpoint.pt", size=10, xxh3_128=HASH),), created_unix=1.5)
    fields.update(overrides)
    return Manifest(**fields)


def single_file(**overrides) -> Manifest:
    """A single-file manifest (format 3): its one entry and its load path are its own name."""
    name = overrides.pop("name", "epoch=0-step=5.ckpt")
    return sample(name=name, shape="file", kind="lightning", load_path=name,
                  files=(FileEntry(path=name, size=10, xxh3_128=HASH),), **overrides)


def test_round_trip():
    for m in (sample(metadata={"loss": 0.5}, layout={"zero_stage": 3}), single_file(alias_of="epoch=0-step=4.ckpt")):
        assert parse_manifest(m.to_json_bytes(), where="x") == m


@pytest.mark.parametrize("version, algorithm, shape, path", [
    (1, "xxh3_128", "directory", "checkpoint.pt"),
    (2, "xxh3_128-chunked-64MiB", "directory", "checkpoint.pt"),
    (3, "xxh3_128-chunked-64MiB", "file", "epoch=3-step=1200.ckpt"),
])
def test_golden_fixtures_of_every_version_still_parse(version, algorithm, shape, path):
    with open(os.path.join(FIXTURES, f"manifest_v{version}.json"), "rb") as f:
        data = f.read()
    m = parse_manifest(data, where="fixture")
    assert (m.step, m.epoch, m.sequence, m.format_version) == (1200, 3, 7, version)
    assert m.files[0].path == path and m.hash_algorithm == algorithm and m.shape == shape
    assert m.to_json_bytes() == data  # re-encoding keeps its version


def test_self_hash_detects_an_edit():
    body = json.loads(sample().to_json_bytes())
    body["step"] = 6
    with pytest.raises(ManifestError, match="self-hash mismatch"):
        parse_manifest(json.dumps(body).encode(), where="x")


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update(format_version=4), "version 4 is not supported"),
    (lambda b: b.update(format_version="3"), "version '3' is not supported"),
    (lambda b: b.update(format_version=2), "unknown fields \\['alias_of', 'shape'\\]"),
    (lambda b: (b.update(format_version=1), b.pop("shape"), b.pop("alias_of")),
     "unknown hash algorithm .* for format version 1"),
    (lambda b: b.update(format="other"), "format is 'other'"),
    (lambda b: b.update(surprise=1), "unknown fields"),
    (lambda b: b.pop("sequence"), "lacks field 'sequence'"),
    (lambda b: b.update(step="5"), "'step' has type str"),
    (lambda b: b.update(step=True), "'step' has type bool"),
    (lambda b: b.update(step=-1), "non-negative"),
    (lambda b: b.update(epoch_end=1), "'epoch_end' has type int"),
    (lambda b: b.update(files={"a": 1}), "'files' has type dict"),
    (lambda b: b.update(hash_algorithm="md5"), "unknown hash algorithm"),
    (lambda b: b.update(load_path="../x"), "escapes"),
    (lambda b: b.update(load_path="other.pt"), "load_path 'other.pt' is not one of its files"),
    (lambda b: b.update(epoch=-5), "'epoch' must be a non-negative integer or null"),
    (lambda b: b.update(world_size=0), "'world_size' must be at least 1"),
    (lambda b: b.update(kind="pickle"), "kind 'pickle' is not one of"),
    (lambda b: b.update(shape="blob"), "shape 'blob' is not one of"),
    (lambda b: b.update(name="a/b.ckpt"), "one path component"),
    (lambda b: b.update(name=".ckptmgr"), "reserved"),
    (lambda b: b.update(alias_of="../x"), "one path component"),
    (lambda b: b.update(timing={"write_seconds": "fast"}), "timing 'write_seconds' must be a finite number"),
    (lambda b: b.update(layout={"shards": {"0": [{"x": 1}]}}), "not a file path"),
    (lambda b: b.update(layout={"shards": {"0": [1, "a"]}}), "not a file path"),
    (lambda b: b.update(layout={"shards": {"0": "checkpoint.pt"}}), "map rank numbers to lists"),
    (lambda b: b.update(layout={"shards": {"x": ["checkpoint.pt"]}}), "map rank numbers to lists"),
    (lambda b: b.update(layout={"shards": {"0": ["missing.pt"]}}), "names shard 'missing.pt' that its files"),
    (lambda b: b.update(layout={"zero_stage": "3"}), "'zero_stage' must be a non-negative integer"),
])
def test_strict_fields(change, message):
    body = json.loads(sample().to_json_bytes())
    change(body)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(resigned(body), where="x")


@pytest.mark.parametrize("path", ["../evil", "/etc/passwd", "a/../../b", "a//b", "./a", "a\\b", "", "a/", MANIFEST_NAME,
                                  "a\x00b"])
def test_file_paths_that_escape_are_refused(path):
    body = json.loads(sample().to_json_bytes())
    body["files"] = [{"path": path, "size": 1, "xxh3_128": HASH}]
    with pytest.raises(ManifestError):
        parse_manifest(resigned(body), where="x")


@pytest.mark.parametrize("entry", [
    {"path": "a", "size": -1, "xxh3_128": HASH},
    {"path": "a", "size": 1 << 60, "xxh3_128": HASH},
    {"path": "a", "size": 1.5, "xxh3_128": HASH},
    {"path": "a", "size": 1, "xxh3_128": "xyz"},
    {"path": "a", "size": 1, "xxh3_128": HASH.upper()},
    {"path": "a", "size": 1},
    {"path": "a", "size": 1, "xxh3_128": HASH, "mode": 7},
    ["a", 1, HASH],
])
def test_bad_file_entries(entry):
    body = json.loads(sample().to_json_bytes())
    body["files"] = [entry]
    with pytest.raises(ManifestError):
        parse_manifest(resigned(body), where="x")


def test_duplicate_file_entry():
    body = json.loads(sample().to_json_bytes())
    body["files"] = [{"path": "a", "size": 1, "xxh3_128": HASH}] * 2
    with pytest.raises(ManifestError, match="twice"):
        parse_manifest(resigned(body), where="x")


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"format": "ckptmgr"}'])
def test_garbage_is_refused(data):
    with pytest.raises(ManifestError):
        parse_manifest(data, where="x")


@pytest.mark.parametrize("created", ["NaN", "Infinity", "-Infinity", "-1"])
def test_created_unix_must_be_a_finite_time(created):
    """JSON has no NaN; Python's json reads one anyway, and --json would then print a bare NaN."""
    body = json.loads(sample().to_json_bytes())
    body["created_unix"] = 0.0
    data = resigned(body).replace(b'"created_unix": 0.0', f'"created_unix": {created}'.encode())
    with pytest.raises(ManifestError):
        parse_manifest(data, where="x")


@pytest.mark.parametrize("payload", [b"[" * 400_000, b'{"a":' * 100_000, b'{"metadata": ' + b"[" * 5000 + b"]" * 5000
                                     + b"}"])
def test_deep_nesting_is_refused_without_recursion(payload):
    with pytest.raises(ManifestError, match="nests deeper|not valid JSON"):
        parse_manifest(payload, where="x")


def test_brackets_inside_strings_do_not_count_as_nesting():
    m = sample(metadata={"note": "[[[[" * 100 + '\\"' + "{{{{" * 100})
    assert parse_manifest(m.to_json_bytes(), where="x") == m


@pytest.mark.parametrize("change", [
    lambda b: b.update(files=[{"path": "other.ckpt", "size": 10, "xxh3_128": HASH}]),
    lambda b: b.update(load_path="other.ckpt"),
    lambda b: b.update(files=[*b["files"], {"path": "b", "size": 1, "xxh3_128": HASH}]),
])
def test_a_single_file_manifest_describes_exactly_its_own_name(change):
    body = json.loads(single_file().to_json_bytes())
    change(body)
    with pytest.raises(ManifestError, match="single-file manifest"):
        parse_manifest(resigned(body), where="x")


def test_huge_manifest_is_refused_unread():
    with pytest.raises(ManifestError, match="over the"):
        parse_manifest(b" " * (33 * 1024 * 1024), where="x")
