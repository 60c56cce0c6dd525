"""Object-storage checks: is the store behind an s3:// URL usable with the credentials at hand?

`probe_store(url, action)` lists at most one key under the URL's prefix with the credentials and
endpoint mosaicml-streaming uses (AWS_* variables or a profile, S3_ENDPOINT_URL) and raises a
one-line UserError that names the URL, the bucket, the endpoint and what to check: wrong or
missing credentials, an unreachable or malformed endpoint, a missing bucket, another region,
denied access. `convert --out s3://...` calls it before converting; readers call it when a fetch
fails, to tell a store problem from a prefix that holds no dataset. The probe needs
s3:ListBucket on the bucket, as streaming's S3 uploader does. Other schemes are not probed:
their errors reach the user as the storage library words them.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from ..errors import UserError
from .info import first_line

PROBE_ATTEMPTS = 2
"""Attempts per probe request: a dead endpoint fails in about a second, not after minutes of retries."""

_KEY_CODES = {"InvalidAccessKeyId", "InvalidClientTokenId", "UnrecognizedClientException"}
_SECRET_CODES = {"SignatureDoesNotMatch"}
_TOKEN_CODES = {"InvalidToken", "ExpiredToken", "TokenRefreshRequired", "ExpiredTokenException"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403", "Forbidden"}
_BUCKET_CODES = {"NoSuchBucket", "404", "NotFound"}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301"}


def s3_client(unsigned: bool = False) -> Any:
    """An S3 client as streaming builds one (endpoint from S3_ENDPOINT_URL), with few retries."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": PROBE_ATTEMPTS, "mode": "standard"},
        connect_timeout=10,
        read_timeout=30,
        **({"signature_version": UNSIGNED} if unsigned else {}),
    )
    return boto3.session.Session().client("s3", config=config, endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None)


def split_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix) of s3://bucket/prefix."""
    parsed = urlparse(url)
    return parsed.netloc, parsed.path.lstrip("/")


def probe_store(url: str, action: str) -> None:
    """Raise UserError if the store behind `url` refuses or cannot be reached; `action`: "read" or "upload to".

    For "read" without any credentials the probe is repeated unsigned, as streaming falls back to
    anonymous access for public buckets.
    """
    if urlparse(str(url)).scheme != "s3":
        return
    from botocore.exceptions import NoCredentialsError

    bucket, prefix = split_s3_url(url)
    client = None
    try:
        client = s3_client()
        try:
            client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except NoCredentialsError as no_credentials:
            if action != "read":
                raise
            try:
                s3_client(unsigned=True).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
            except Exception:  # not a public bucket: the missing credentials are the problem
                raise no_credentials from None
    except Exception as err:  # every failure of the probe is the store's or the settings'
        raise store_error(url, err, action, client) from None


def store_error(url: str, err: BaseException, action: str, client: Any = None) -> UserError:
    """One UserError line for an S3 failure: what the store said and which setting to check."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    bucket, _ = split_s3_url(url)
    endpoint = getattr(getattr(client, "meta", None), "endpoint_url", None) or os.environ.get(
        "S3_ENDPOINT_URL", "the default AWS endpoint"
    )
    cause = _root_cause(err, (ClientError, BotoCoreError))
    writing = action != "read"
    if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
        if isinstance(cause, PartialCredentialsError):
            problem = first_line(cause)
        else:
            problem = "no AWS credentials found" + (" and the bucket refuses anonymous reads" if not writing else "")
        fix = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    elif isinstance(cause, (BotoConnectionError, HTTPClientError)):
        problem = f"the endpoint does not answer ({type(cause).__name__})"
        fix = "check S3_ENDPOINT_URL and the network"
    elif isinstance(cause, ClientError):
        code = str(cause.response.get("Error", {}).get("Code", "unknown"))
        if code in _KEY_CODES:
            problem = f"the store does not know access key {_access_key()} ({code})"
            fix = "check AWS_ACCESS_KEY_ID (or AWS_PROFILE) and that S3_ENDPOINT_URL is the store the key belongs to"
        elif code in _SECRET_CODES:
            problem = f"the secret key does not match access key {_access_key()} ({code})"
            fix = "check AWS_SECRET_ACCESS_KEY"
        elif code in _TOKEN_CODES:
            problem = f"the session token was refused ({code})"
            fix = "check AWS_SESSION_TOKEN (temporary credentials expire)"
        elif code in _BUCKET_CODES:
            problem = f"the bucket does not exist ({code})"
            fix = "check the bucket name in the URL and S3_ENDPOINT_URL"
        elif code in _REGION_CODES:
            problem = f"the bucket is in another region ({code})"
            fix = "check AWS_DEFAULT_REGION (or AWS_REGION)"
        elif code in _DENIED_CODES:
            needs = "s3:ListBucket and s3:PutObject" if writing else "s3:ListBucket and s3:GetObject"
            problem = f"access key {_access_key()} was denied ({code})"
            fix = f"check that its policy grants {needs} on the bucket"
        else:
            problem = f"the store refused the request ({code}: {first_line(cause)})"
            fix = "check the credentials, S3_ENDPOINT_URL and the bucket name"
    elif isinstance(cause, ValueError) and "endpoint" in str(cause).lower():
        problem = f"S3_ENDPOINT_URL={os.environ.get('S3_ENDPOINT_URL')!r} is not a valid URL"
        fix = "set it to the store's URL, e.g. http://host:9000"
    else:
        problem = f"{type(cause).__name__}: {first_line(cause)}"
        fix = "check the credentials, S3_ENDPOINT_URL and the bucket name"
    return UserError(f"cannot {action} {url} (bucket {bucket!r} at {endpoint}): {problem}; {fix}")


def _root_cause(err: BaseException, kinds: tuple[type, ...]) -> BaseException:
    """The first exception of `kinds` in the chain (boto3 wraps upload errors in S3UploadFailedError)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, kinds):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


def _access_key() -> str:
    """The access key id in use (an identifier, not a secret), wherever boto3 found it."""
    import boto3

    try:
        credentials = boto3.session.Session().get_credentials()
    except Exception:  # an unreadable profile: the message still names the setting to check
        credentials = None
    return credentials.access_key if credentials is not None else "(none)"
