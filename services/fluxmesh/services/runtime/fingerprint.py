"""A short, stable name for "these model files, as they are on disk now".

The orchestrator's prompt cache keys embeddings by the encoder's identity (its Info), so the
identity must change whenever the embeddings could: other weights, another dtype, another T5
length default, a LoRA file replaced. Hashing the weights' bytes would take seconds for T5-XXL;
path, size and modification time of each file are what a replaced file changes, read in
microseconds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def files_fingerprint(paths: Iterable[Path | None], *facts: object) -> str:
    """sha256 (16 hex digits) over each file's path, size and mtime (every file below a
    directory) and `facts`; a missing path counts as missing."""
    digest = hashlib.sha256()
    for fact in facts:
        digest.update(repr(fact).encode() + b"\0")
    for path in paths:
        if path is None:
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            try:
                stat = file.stat()
            except OSError:
                digest.update(f"{file}:missing\0".encode())
                continue
            digest.update(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]
