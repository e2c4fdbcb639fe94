"""The manifest parser is strict: every malformed input is a ManifestError, never a default."""

from __future__ import annotations

import json
import os

import pytest

from ckptmgr.errors import ManifestError
from ckptmgr.hashing import digest_bytes
from ckptmgr.manifest import MANIFEST_NAME, FileEntry, Manifest, parse_manifest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HASH = "ab" * 16


def sample(**overrides) -> Manifest:
    fields = dict(name="epoch=0-step=5.ckpt", step=5, epoch=0, sequence=1, kind="torch", load_path="checkpoint.pt",
                  files=(FileEntry(path="checkpoint.pt", size=10, xxh3_128=HASH),), created_unix=1.5)
    fields.update(overrides)
    return Manifest(**fields)


def resigned(body: dict) -> bytes:
    """Re-compute the self-hash so only the field under test is wrong."""
    body = dict(body)
    body.pop("manifest_xxh3_128", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    body["manifest_xxh3_128"] = digest_bytes(canonical)
    return json.dumps(body).encode()


def test_round_trip():
    m = sample(metadata={"loss": 0.5}, layout={"zero_stage": 3})
    assert parse_manifest(m.to_json_bytes(), where="x") == m


@pytest.mark.parametrize("version, algorithm", [(1, "xxh3_128"), (2, "xxh3_128-chunked-64MiB")])
def test_golden_fixtures_of_every_version_still_parse(version, algorithm):
    with open(os.path.join(FIXTURES, f"manifest_v{version}.json"), "rb") as f:
        data = f.read()
    m = parse_manifest(data, where="fixture")
    assert (m.step, m.epoch, m.sequence, m.kind) == (1200, 3, 7, "torch")
    assert m.files[0].path == "checkpoint.pt" and m.hash_algorithm == algorithm
    assert m.to_json_bytes() == data  # re-encoding keeps its version


def test_self_hash_detects_an_edit():
    body = json.loads(sample().to_json_bytes())
    body["step"] = 6
    with pytest.raises(ManifestError, match="self-hash mismatch"):
        parse_manifest(json.dumps(body).encode(), where="x")


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update(format_version=3), "version 3 is not supported"),
    (lambda b: b.update(format_version=1), "unknown hash algorithm .* for format version 1"),
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


def test_huge_manifest_is_refused_unread():
    with pytest.raises(ManifestError, match="over the"):
        parse_manifest(b" " * (33 * 1024 * 1024), where="x")
