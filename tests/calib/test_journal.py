"""The search journal on its own: header identity, durable records, torn tails, corruption, locking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calib.journal import JOURNAL_FORMAT, JOURNAL_VERSION, Journal, decode_entry, encode_entry
from prune_core.errors import JournalError, PruneExportError
from prune_core.ops import Group, Module, Operation

IDENTITY = {
    "model_fingerprint": "sha256:0123456789abcdef",
    "calibration": "sha256:calib",
    "metric": {"name": "accuracy", "higher_is_better": True},
    "settings": {"tolerance": 0.3, "steps": 15, "free_block_groups": ["img_rest", "img_key"]},
}
A = frozenset({Operation(7, Group.IMG_REST, Module.Q), Operation(6, Group.IMG_KEY, Module.KV)})
B = frozenset({Operation(5, Group.IMG_REST, Module.MLP)})


def write_two(path: Path) -> None:
    with Journal.open(path, IDENTITY) as journal:
        journal.record(A, 0.1 + 0.2)  # a float with a long repr must come back bit-exact
        journal.record(frozenset(), 0.6)
        journal.record(B, float("-inf"))


def test_records_survive_reopening_bit_exact(tmp_path: Path) -> None:
    path = tmp_path / "search.journal.jsonl"
    write_two(path)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header == {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "identity": IDENTITY}
    assert json.loads(lines[1])["ops"] == [[6, "img_key", "kv"], [7, "img_rest", "q"]]  # sorted
    with Journal.open(path, IDENTITY, resume=True) as journal:
        assert journal.loaded == len(journal) == 3 and not journal.notices
        assert journal.get(A) == 0.1 + 0.2 and journal.get(frozenset()) == 0.6
        assert journal.get(B) == float("-inf") and A in journal
        journal.record(A, 123.0)  # already known: nothing is appended
    assert len(path.read_text().splitlines()) == 4


def test_entry_round_trip_and_validation() -> None:
    assert decode_entry(encode_entry(A, 0.25).decode()) == (A, 0.25)
    with pytest.raises(ValueError, match="exactly the keys"):
        decode_entry('{"ops": []}')
    with pytest.raises(ValueError, match="number"):
        decode_entry('{"ops": [], "value": true}')
    with pytest.raises(ValueError):
        decode_entry('{"ops": [[1, "img_rest", "attn"]], "value": 0.5}')


def test_existing_journal_needs_resume(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    write_two(path)
    with pytest.raises(JournalError, match="pass --resume .* or delete the journal"):
        Journal.open(path, IDENTITY)
    assert issubclass(JournalError, PruneExportError)


def test_resume_without_a_journal_starts_one(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "sub" / "j.jsonl", IDENTITY, resume=True) as journal:
        assert len(journal) == 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_fingerprint", "sha256:ffffffffffffffff", r"model_fingerprint: journal has 'sha256:0123456789abcdef'"),
        ("calibration", "sha256:other", "calibration"),
        ("metric", {"name": "kl", "higher_is_better": False}, r"metric\.name: journal has 'accuracy'"),
        ("settings", {**IDENTITY["settings"], "steps": 20}, r"settings\.steps: journal has 15, this search has 20"),
    ],
)
def test_journal_of_another_search_is_refused(tmp_path: Path, field: str, value: object, message: str) -> None:
    path = tmp_path / "j.jsonl"
    write_two(path)
    with pytest.raises(JournalError, match=message) as info:
        Journal.open(path, {**IDENTITY, field: value}, resume=True)
    assert "delete the journal or choose another --out" in str(info.value)


def test_identity_compares_as_json(tmp_path: Path) -> None:
    """Tuples and enums in the caller's identity equal the lists and strings read back from the header."""
    path = tmp_path / "j.jsonl"
    write_two(path)
    settings = {**IDENTITY["settings"], "free_block_groups": (Group.IMG_REST, Group.IMG_KEY)}
    with Journal.open(path, {**IDENTITY, "settings": settings}, resume=True) as journal:
        assert len(journal) == 3


def test_torn_last_line_is_cut_with_a_notice(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    write_two(path)
    complete = path.read_bytes()
    with path.open("ab") as fh:
        fh.write(b'{"ops":[[5,"img_rest","mlp"]],"val')
    with Journal.open(path, IDENTITY, resume=True) as journal:
        assert len(journal) == 3
        assert len(journal.notices) == 1 and "torn" in journal.notices[0] and "will run again" in journal.notices[0]
        assert path.read_bytes() == complete
        journal.record(frozenset({Operation(4, Group.IMG_REST, Module.Q)}), 0.5)
    with Journal.open(path, IDENTITY, resume=True) as journal:  # the appended record is a clean line
        assert len(journal) == 4 and not journal.notices


def test_torn_header_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"format": "prune-export-search-jou')
    with Journal.open(path, IDENTITY, resume=True) as journal:
        assert len(journal) == 0 and journal.notices
    assert json.loads(path.read_text().splitlines()[0])["identity"] == IDENTITY


def test_corrupt_middle_line_is_refused_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    write_two(path)
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = "#garbage#\n"
    path.write_text("".join(lines))
    with pytest.raises(JournalError, match=r"corrupt at line 3 .*delete the journal"):
        Journal.open(path, IDENTITY, resume=True)


def test_not_a_journal_and_other_version(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text('{"format": "prune-export-plan"}\n')
    with pytest.raises(JournalError, match="not a prune-export search journal"):
        Journal.open(path, IDENTITY, resume=True)
    header = {"format": JOURNAL_FORMAT, "version": 99, "identity": IDENTITY}
    path.write_text(json.dumps(header) + "\n")
    with pytest.raises(JournalError, match="format version 99"):
        Journal.open(path, IDENTITY, resume=True)


def test_a_journal_in_use_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal.open(path, IDENTITY):
        with pytest.raises(JournalError, match="in use by another running search"):
            Journal.open(path, IDENTITY, resume=True)
    with Journal.open(path, IDENTITY, resume=True) as journal:  # released on close
        assert not journal.closed
    assert journal.closed
    with pytest.raises(JournalError, match="closed"):
        journal.record(A, 0.5)
