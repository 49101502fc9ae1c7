"""The search journal: an append-only record of finished evaluations, so a killed search resumes losslessly.

A GSOP search costs hundreds of calibration passes; a crash, a pre-empted GPU or a Ctrl-C must not throw
them away. The journal is a JSON-lines file:

* line 1, the header: ``{"format": "prune-export-search-journal", "version": 1, "identity": {...}}``.
  The identity is a JSON object chosen by the caller (model fingerprint, calibration-data hash, metric,
  the settings that change the result; see :func:`calib.search.journal_identity`). A journal is only ever
  reused by a search with the very same identity, because its values are only valid for that search.
* every further line, one finished evaluation: ``{"ops": [[layer, group, module], ...], "value": v}``
  with the operations sorted canonically. Each line is flushed and fsynced before the search goes on, so
  what the file holds is exactly what finished.

Resuming (``resume=True``) reloads every complete line into memory. A kill in the middle of a write can
only tear the *last* line (it then lacks its newline); that line is cut away with a notice and its
evaluation is simply run again. Anything else that does not parse is corruption and is refused with the
line number, never silently skipped: a search built on a damaged record would not be reproducible.

An advisory lock (where the platform has ``fcntl``) keeps two searches from appending to one journal.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from prune_core.errors import JournalError
from prune_core.ops import Operation

try:  # POSIX only; elsewhere the journal simply goes unlocked.
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

JOURNAL_FORMAT = "prune-export-search-journal"
JOURNAL_VERSION = 1

OpSet = frozenset[Operation]


def _canonical(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, enums their values), for comparison."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    value = getattr(obj, "value", None)  # str enums (Group, Module)
    if isinstance(value, str):
        return value
    raise TypeError(f"journal identity holds {type(obj).__name__} {obj!r}, which JSON cannot store")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}`` so a mismatch can name the exact field."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, val in obj.items():
            out.update(_flatten(val, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix or "<identity>": obj}


def identity_differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Human-readable list of the fields in which two identities differ (empty when they match)."""
    old, new = _flatten(_canonical(dict(recorded))), _flatten(_canonical(dict(wanted)))
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            diffs.append(f"{key}: journal has {old[key]!r}, this search has no such field")
        elif key not in old:
            diffs.append(f"{key}: journal has no such field, this search has {new[key]!r}")
        elif old[key] != new[key]:
            diffs.append(f"{key}: journal has {old[key]!r}, this search has {new[key]!r}")
    return diffs


def encode_entry(ops: Iterable[Operation], value: float) -> bytes:
    """One journal line (with its newline) for a finished evaluation."""
    record = {"ops": [op.to_json() for op in sorted(set(ops))], "value": float(value)}
    return (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")


def decode_entry(line: str) -> tuple[OpSet, float]:
    """Parse one evaluation line; raises ValueError with the reason when it is not one."""
    record = json.loads(line)
    if not isinstance(record, dict) or set(record) != {"ops", "value"}:
        raise ValueError('expected an object with exactly the keys "ops" and "value"')
    ops_raw, value = record["ops"], record["value"]
    if not isinstance(ops_raw, list):
        raise ValueError('"ops" must be a list of [layer, group, module]')
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f'"value" must be a number, got {value!r}')
    return frozenset(Operation.parse(item) for item in ops_raw), float(value)


class Journal:
    """An open search journal: the recorded evaluations (a read-only mapping) plus :meth:`record`.

    Open with :meth:`open`; use as a context manager (or call :meth:`close`) to release the file and lock.
    ``notices`` lists what was repaired on opening (a torn last line), for the CLI to show.
    """

    def __init__(self, path: Path, identity: dict[str, Any], entries: dict[OpSet, float], fh: BinaryIO,
                 notices: list[str]) -> None:
        self.path = path
        self.identity = identity
        self._entries = entries
        self._fh: BinaryIO | None = fh
        self.notices = notices
        #: Evaluations found in the file when it was opened (0 for a new journal).
        self.loaded = len(entries)

    # -- opening ---------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], identity: Mapping[str, Any], resume: bool = False) -> Journal:
        """Create a journal for a new search, or (``resume=True``) reopen the one of an interrupted search.

        Raises :class:`JournalError` when the file exists without ``resume``, belongs to a search with
        another identity, or is corrupt before its last line.
        """
        path = Path(path)
        wanted = _canonical(dict(identity))
        if not isinstance(wanted, dict):  # pragma: no cover - guarded by the Mapping type
            raise TypeError("journal identity must be a JSON object")
        exists = path.exists()
        if exists and not resume:
            raise JournalError(
                f"search journal {path} already exists (left by an earlier search); pass --resume to "
                "continue that search, or delete the journal (or choose another --out) to start over"
            )
        if exists and not path.is_file():
            raise JournalError(f"search journal {path} is not a regular file; choose another --out")
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+b")  # noqa: SIM115 - owned by the Journal, closed in close()
        try:
            _lock(fh, path)
            entries, notices = cls._load(fh, path, wanted)
        except BaseException:
            fh.close()
            raise
        return cls(path, wanted, entries, fh, notices)

    @staticmethod
    def _load(fh: BinaryIO, path: Path, wanted: dict[str, Any]) -> tuple[dict[OpSet, float], list[str]]:
        """Read (and if needed repair) the file behind ``fh``; write the header to an empty one."""
        fh.seek(0)
        data = fh.read()
        notices: list[str] = []
        complete_end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
        if complete_end < len(data):
            torn = len(data) - complete_end
            what = "that evaluation will run again" if complete_end else "the journal starts afresh"
            notice = (
                f"search journal {path}: the last line was torn ({torn} bytes without a newline, the search was "
                f"killed while writing it); removed it, {what}"
            )
            notices.append(notice)
            log.warning(notice)
            fh.truncate(complete_end)
            fh.flush()
            os.fsync(fh.fileno())
            data = data[:complete_end]
        if not data:
            header = {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "identity": wanted}
            _append(fh, (json.dumps(header, sort_keys=True) + "\n").encode("utf-8"))
            return {}, notices
        lines = data.decode("utf-8", errors="replace").split("\n")[:-1]
        _check_header(lines[0], path, wanted)
        entries: dict[OpSet, float] = {}
        for number, line in enumerate(lines[1:], start=2):
            try:
                ops, value = decode_entry(line)
            except (ValueError, TypeError) as exc:
                raise JournalError(
                    f"search journal {path} is corrupt at line {number} ({exc}: {line[:80]!r}); only the last "
                    "line can be torn by a kill, so the file was damaged otherwise; delete the journal (or "
                    "choose another --out) and search again"
                ) from None
            entries.setdefault(ops, value)
        return entries, notices

    # -- use -------------------------------------------------------------------------------------------
    def record(self, ops: Iterable[Operation], value: float) -> None:
        """Append one finished evaluation and make it durable (flush + fsync) before returning."""
        if self._fh is None:
            raise JournalError(f"search journal {self.path} is closed; reopen it with --resume")
        key = frozenset(ops)
        if key in self._entries:
            return
        _append(self._fh, encode_entry(key, value))
        self._entries[key] = float(value)

    def get(self, ops: OpSet) -> float | None:
        return self._entries.get(ops)

    def __contains__(self, ops: object) -> bool:
        return ops in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[OpSet]:
        return iter(self._entries)

    def items(self) -> Iterable[tuple[OpSet, float]]:
        return self._entries.items()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()  # also releases the flock
            self._fh = None

    @property
    def closed(self) -> bool:
        return self._fh is None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _append(fh: BinaryIO, line: bytes) -> None:
    fh.seek(0, os.SEEK_END)
    fh.write(line)
    fh.flush()
    os.fsync(fh.fileno())


def _lock(fh: BinaryIO, path: Path) -> None:
    if fcntl is None:  # pragma: no cover
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise JournalError(
            f"search journal {path} is in use by another running search; wait for it to finish or choose "
            "another --out"
        ) from None


def _check_header(line: str, path: Path, wanted: dict[str, Any]) -> None:
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != JOURNAL_FORMAT:
        raise JournalError(
            f"{path} is not a prune-export search journal (line 1 is not its header); choose another --out "
            "or delete the file"
        )
    if header.get("version") != JOURNAL_VERSION:
        raise JournalError(
            f"search journal {path} has format version {header.get('version')!r}, this prune-export reads "
            f"version {JOURNAL_VERSION}; delete the journal (or choose another --out) and search again"
        )
    recorded = header.get("identity")
    if not isinstance(recorded, dict):
        raise JournalError(f"search journal {path}: the header has no identity object; delete the journal")
    diffs = identity_differences(recorded, wanted)
    if diffs:
        raise JournalError(
            f"search journal {path} belongs to another search ({'; '.join(diffs)}); its evaluations are not "
            "valid for this one: delete the journal or choose another --out"
        )
