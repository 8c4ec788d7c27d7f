"""User-supplied paths (run directories, data, tokenizers, checkpoints, caches) as `etils.epath`
paths, so that they may live on `gs://` like on a local disk. Every layer may use these."""
from __future__ import annotations

import os

from etils import epath

from glm5v_jax.errors import ConfigError

WILDCARDS = "*?["


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` paths (gs://, s3://, ...), which are never relative to the cwd."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path; local paths made absolute (orbax wants absolute paths), URIs such as
    `gs://bucket/run` left as they are (pathlib's absolute() would turn them into `cwd/gs:/...`)."""
    p = epath.Path(path)
    return p if is_uri(path) else p.absolute()


def expand_globs(patterns: str, field: str) -> list[str]:
    """The files matching comma-separated glob `patterns` (local or `gs://`), sorted; ConfigError
    naming `field` when nothing matches. Wildcards may sit in any path component after the first
    (`gs://bucket/*/train-*.array_record`)."""
    found: set[str] = set()
    for pattern in (p.strip() for p in str(patterns).split(",")):
        if not pattern:
            continue
        scheme, sep, rest = pattern.rpartition("://")
        parts = rest.split("/")
        first = next((i for i, part in enumerate(parts) if any(c in part for c in WILDCARDS)), len(parts))
        if first == len(parts):  # no wildcard: the file itself
            if as_path(pattern).exists():
                found.add(str(as_path(pattern)))
            continue
        base = (scheme + sep if sep else "") + ("/".join(parts[:first]) or ("/" if rest.startswith("/") else "."))
        found.update(str(p) for p in as_path(base).glob("/".join(parts[first:])))
    if not found:
        raise ConfigError(field, f"no files match {patterns!r}")
    return sorted(found)
