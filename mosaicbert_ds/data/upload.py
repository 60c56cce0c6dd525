"""Copy a finished local dataset to object storage (s3://, gs://, oci://, azure://, ...).

Uses mosaicml-streaming's uploaders, so credentials and endpoints are the ones streaming reads
(for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile, S3_ENDPOINT_URL for S3-compatible
stores). Shards, split indexes and the tokenizer go first and `mosaicbert_index.json` last, so a
reader never finds a remote dataset that looks finished before every file is there.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .info import INDEX_NAME, PARTIAL_MARKER, first_line


def upload_dataset(local: str, remote: str) -> int:
    """Upload the finished dataset at `local` to the URL `remote`; returns the number of files."""
    from streaming.base.storage.upload import CloudUploader

    root = Path(local)
    if not (root / INDEX_NAME).exists() or (root / PARTIAL_MARKER).exists():
        raise UserError(f"{local} is not a finished dataset; nothing uploaded")
    files = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".mds" and p.name != INDEX_NAME
    )  # raw .mds: decompressed caches
    try:
        uploader = CloudUploader.get((str(root), remote.rstrip("/")), keep_local=True, exist_ok=True)
        for name in files + [INDEX_NAME]:
            uploader.upload_file(name)
    except Exception as err:  # any backend: unreachable, denied, no such bucket
        raise UserError(
            f"upload to {remote} failed ({first_line(err)}); the local dataset {local} is intact "
            "and the remote one unfinished (no index); re-run to upload again"
        ) from None
    return len(files) + 1


def stage_dir(remote: str) -> str:
    """The local folder a conversion for `remote` is written to before it is uploaded."""
    from .info import default_cache_dir

    return os.path.join(default_cache_dir(remote), "stage")
