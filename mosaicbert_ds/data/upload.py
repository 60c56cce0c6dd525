"""Copy a finished local dataset to object storage (s3://, gs://, oci://, azure://, ...).

Uses mosaicml-streaming's uploaders, so credentials and endpoints are the ones streaming reads
(for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile, S3_ENDPOINT_URL for S3-compatible
stores). Shards, split indexes and the tokenizer go first and `mosaicbert_index.json` last, so a
reader never finds a remote dataset that looks finished before every file is there.

A URL that already holds a finished dataset is left alone when it is the same dataset (same
fingerprint) and refused when it is another one, unless `overwrite`: then its index is removed
first (s3:// only), so a failed replacement leaves no index over a mix of old and new shards.
Nothing else in the store is removed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import UserError
from .dataset import STAMP_SUFFIX
from .info import INDEX_NAME, PARTIAL_MARKER, _fetch, first_line


def check_upload_target(remote: str) -> None:
    """Before converting for `remote`: the store takes the credentials and the bucket exists (s3://)."""
    from .store import probe_store

    probe_store(remote, "upload to")


def upload_dataset(local: str, remote: str, overwrite: bool = False) -> int:
    """Upload the finished dataset at `local` to the URL `remote`; returns the number of files sent."""
    from streaming.base.storage.upload import CloudUploader

    root = Path(local)
    if not (root / INDEX_NAME).exists() or (root / PARTIAL_MARKER).exists():
        raise UserError(f"{local} is not a finished dataset; nothing uploaded")
    remote = remote.rstrip("/")
    index = json.loads((root / INDEX_NAME).read_text(encoding="utf-8"))
    existing = _remote_index(remote)
    if existing is not None and not overwrite:
        if existing.get("fingerprint") == index.get("fingerprint"):
            return 0
        raise UserError(
            f"{remote} already holds a different mosaicbert_ds dataset; pass --overwrite to replace it "
            f"or choose another --out (the converted copy stays in {local})"
        )
    files = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.suffix not in (".mds", STAMP_SUFFIX) and p.name != INDEX_NAME
    )  # raw .mds and their stamps: decompressed caches
    try:
        if existing is not None:
            _remove_remote_index(remote)
        # streaming warns that the local folder is not empty: it is the dataset being uploaded
        quiet = logging.getLogger("streaming.base.storage.upload")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            uploader = CloudUploader.get((str(root), remote), keep_local=True, exist_ok=True)
        finally:
            quiet.setLevel(level)
        for name in files + [INDEX_NAME]:
            uploader.upload_file(name)
    except UserError:
        raise
    except Exception as err:  # any backend: unreachable, denied, no such bucket
        if remote.startswith("s3://"):
            from .store import store_error

            reason = str(store_error(remote, err, "upload to"))
        else:
            reason = f"upload to {remote} failed ({first_line(err)})"
        raise UserError(
            f"{reason}; the converted copy in {local} is finished and kept, and {remote} has no "
            f"{INDEX_NAME}, so readers refuse it; re-run to upload again"
        ) from None
    return len(files) + 1


def _remote_index(remote: str) -> dict[str, Any] | None:
    """The index of a finished dataset at `remote`, or None where there is none (or it is unreadable)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, INDEX_NAME)
        try:
            _fetch(f"{remote}/{INDEX_NAME}", local)
            index = json.loads(Path(local).read_text(encoding="utf-8"))
        except Exception:  # missing (the usual case) or not an index: nothing finished to protect
            return None
    return index if isinstance(index, dict) else None


def _remove_remote_index(remote: str) -> None:
    """Delete `remote`'s index before it is replaced, so readers find no dataset during the upload."""
    if not remote.startswith("s3://"):
        raise UserError(
            f"{remote} already holds a dataset and --overwrite can replace it only on s3://; "
            f"delete {remote}/{INDEX_NAME} first, then re-run"
        )
    from .store import s3_client, split_s3_url

    bucket, prefix = split_s3_url(remote)
    s3_client().delete_object(Bucket=bucket, Key=f"{prefix}/{INDEX_NAME}" if prefix else INDEX_NAME)


def stage_dir(remote: str) -> str:
    """The local folder a conversion for `remote` is written to before it is uploaded."""
    from .info import default_cache_dir

    return os.path.join(default_cache_dir(remote), "stage")
