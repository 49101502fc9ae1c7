"""Evaluation and calibration data: JSON-lines rows ``{"image", "question", "answer"}``.

``image`` is a path relative to the JSONL file. ``answer`` may be omitted in label-free mode (metrics that
compare against the dense model need no answers). Every malformed row is reported with its line number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_core.errors import DataError


@dataclass(frozen=True)
class DataRow:
    """One question about one image; ``line`` is the 1-based line in the JSONL file."""

    image_path: Path
    question: str
    answer: str | None
    line: int

    def load_image(self) -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.image_path) as img:
                return img.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"line {self.line}: cannot read image {self.image_path} ({exc})") from None


def load_rows(path: str | Path, require_answer: bool = True, limit: int | None = None) -> list[DataRow]:
    """Parse and check every row of a JSONL file (images must exist; they are opened later)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass a JSONL file of image/question/answer rows")
    rows: list[DataRow] = []
    needed = ("image", "question", "answer") if require_answer else ("image", "question")
    with path.open(encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in needed if k not in obj]
            if missing:
                hint = "" if require_answer else ""
                raise DataError(
                    f"{path}:{number}: missing field(s) {', '.join(missing)}; each row needs "
                    f"{', '.join(needed)}{hint}"
                )
            for key in needed:
                if not isinstance(obj[key], str):
                    raise DataError(f"{path}:{number}: field '{key}' must be a string, got {obj[key]!r}")
            image = (path.parent / obj["image"]).resolve()
            if not image.is_file():
                raise DataError(f"{path}:{number}: image {obj['image']} not found (looked at {image})")
            answer = obj.get("answer")
            rows.append(DataRow(image, obj["question"], answer if isinstance(answer, str) else None, number))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def data_fingerprint(rows: list[DataRow]) -> str:
    """A hash of the rows and image bytes: a search journal is valid only for the same data."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row.question, row.answer]).encode())
        h.update(hashlib.sha256(row.image_path.read_bytes()).digest())
    return "sha256:" + h.hexdigest()[:16]
