"""JSON Lines records read on demand, so a file larger than RAM can be tokenised.

Opening a file scans it once in blocks for the byte span and line number of every non-blank line
(16 bytes per record, kept as numpy arrays); a slice of records reads its contiguous bytes and
parses them then. Records are separated by "\\n" only, as in :func:`swengine.data.records
.read_records_located` (U+2028 and friends are data inside strings), a leading BOM is skipped and
lines of JSON whitespace are not records. Errors name ``file:line``, as the eager reader's do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from swengine.errors import UserError

BLOCK = 4 << 20  # bytes scanned at a time while indexing (~6 bytes of temporaries per byte)
BOM = b"\xef\xbb\xbf"
BLANK = np.zeros(256, dtype=bool)
BLANK[[ord(" "), ord("\t"), ord("\r")]] = True  # what a line may hold and still not be a record
CONTENT = ~BLANK


class JsonlRecords:
    """A .jsonl file's records as a sequence: ``len``, ``slice(start, end)`` (a list of dicts) and
    ``where`` (``file:line`` of each)."""

    def __init__(self, path: str):
        self.path, self.file = path, Path(path).expanduser()
        self.starts, self.ends, self.lines = self._index()
        if not len(self.starts):
            raise UserError(f"{path} holds no records")
        self.where = LineNames(path, self.lines)

    def _index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        starts, ends, lines = [], [], []
        line_no, offset = 1, 0
        with open(self.file, "rb") as f:
            carry = f.read(len(BOM))
            if carry == BOM:
                carry, offset = b"", len(BOM)
            while True:
                block = f.read(BLOCK)
                data = carry + block
                arr = np.frombuffer(data, dtype=np.uint8)
                nl = np.flatnonzero(arr == 10)
                if block:  # more to come: the complete lines only
                    if not len(nl):
                        carry = data
                        continue
                    a, b = np.concatenate([[0], nl[:-1] + 1]), nl
                    last = int(nl[-1]) + 1
                else:  # the end: the last line may have no "\n"
                    a, b = np.concatenate([[0], nl + 1]), np.concatenate([nl, [len(data)]])
                    last = len(data)
                content = np.zeros(len(arr) + 1, dtype=np.int32)  # non-blank bytes before each position
                np.cumsum(CONTENT[arr], dtype=np.int32, out=content[1:])
                real = content[b] - content[a] > 0  # a line of JSON whitespace is no record
                starts.append(offset + a[real])
                ends.append(offset + b[real])
                lines.append(line_no + np.flatnonzero(real))
                line_no += len(a)
                offset += last
                carry = data[last:]
                if not block:
                    break
        return tuple(np.concatenate(x).astype(np.int64) for x in (starts, ends, lines))

    def __len__(self) -> int:
        return len(self.starts)

    def slice(self, start: int, end: int) -> list[dict]:
        end = min(end, len(self))
        if start >= end:
            return []
        with open(self.file, "rb") as f:
            f.seek(int(self.starts[start]))
            raw = f.read(int(self.ends[end - 1] - self.starts[start]))
        base = int(self.starts[start])
        out = []
        for i in range(start, end):
            line = raw[int(self.starts[i]) - base:int(self.ends[i]) - base]
            at = f"{self.path}:{int(self.lines[i])}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{at} is not UTF-8 text (byte {exc.start} of the line: "
                                f"{line[exc.start:exc.start + 1]!r}); save the file as UTF-8") from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"{at} is not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise UserError(f"{at}: every record must be a JSON object (got {type(record).__name__})")
            out.append(record)
        return out

    def __getitem__(self, i: int) -> dict:
        return self.slice(i, i + 1)[0]


class LineNames:
    """``file:line`` of each record, made when asked for (no list of strings)."""

    def __init__(self, path: str, lines: np.ndarray):
        self.path, self.lines = path, lines

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> str:
        return f"{self.path}:{int(self.lines[i])}"


class Concat:
    """Several record sequences (a directory's files) as one, in order; ``where`` likewise."""

    def __init__(self, parts: list, names: list):
        self.parts, self.names = parts, names
        self.bounds = np.cumsum([0, *(len(p) for p in parts)])
        self.where = _ConcatNames(self)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.bounds, i, side="right")) - 1
        return k, i - int(self.bounds[k])

    def slice(self, start: int, end: int) -> list[dict]:
        from swengine.data.sources import row_slice  # (sources imports this module when reading)

        out, end = [], min(end, len(self))
        while start < end:
            k, local = self._locate(start)
            take = min(end - start, len(self.parts[k]) - local)
            out += row_slice(self.parts[k], local, local + take)
            start += take
        return out

    def __getitem__(self, i: int) -> dict:
        return self.slice(i, i + 1)[0]


class _ConcatNames:
    def __init__(self, concat: Concat):
        self.concat = concat

    def __len__(self) -> int:
        return len(self.concat)

    def __getitem__(self, i: int) -> str:
        k, local = self.concat._locate(i)
        return self.concat.names[k][local]
