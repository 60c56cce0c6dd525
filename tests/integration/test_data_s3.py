"""Datasets in object storage, against a real S3-compatible server (moto's) on 127.0.0.1.

The server is started and stopped here; credentials and endpoint reach mosaicml-streaming the
way it reads them (AWS_* variables and S3_ENDPOINT_URL). The `s3` server takes any credentials;
the `vault` server checks signatures and IAM policies (moto's INITIAL_NO_AUTH_ACTION_COUNT), so
wrong or missing keys, denied writes, a missing bucket and a dead endpoint are real refusals.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e .[dev])")
boto3 = pytest.importorskip("boto3")

from mosaicbert_ds.data.info import check_dataset  # noqa: E402
from mosaicbert_ds.errors import UserError  # noqa: E402
from tests.helpers.data import jargon_docs, tokenizer_dir, write_jsonl  # noqa: E402
from tests.helpers.ranks import run_loader_ranks  # noqa: E402
from tests.helpers.runs import ROOT, free_port, losses, pretrain, pretrain_cmd, side_by_side  # noqa: E402


@contextlib.contextmanager
def moto_server(**server_env: str) -> Iterator[str]:
    """A moto server (S3, IAM, ...) in its own process on 127.0.0.1; yields its endpoint URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **server_env},
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("moto server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server that takes any credentials; yields the environment that points at it."""
    with moto_server() as endpoint:
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "S3_ENDPOINT_URL": endpoint,
        }
        old = {k: os.environ.get(k) for k in env}
        try:
            os.environ.update(env)
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="data")
            yield env
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def remote(s3, tmp_path_factory):
    """A small dataset converted straight to s3://data/jargon (staged locally, index uploaded last)."""
    tmp = tmp_path_factory.mktemp("s3data")
    src = write_jsonl(tmp / "docs.jsonl", jargon_docs(700))
    from mosaicbert_ds.data.convert import ConvertConfig, convert_corpus
    from mosaicbert_ds.data.sources import SourceConfig

    convert_corpus(
        ConvertConfig(
            source=SourceConfig(paths=[str(src)]),
            out="s3://data/jargon",
            stage=str(tmp / "stage"),
            tokenizer=str(tokenizer_dir(tmp_path_factory)),
            max_seq_len=64,
            val_docs=64,
            block_docs=200,
            shard_size="16kb",
            workers=1,
            progress=False,
        )
    )
    return "s3://data/jargon"


def test_the_uploaded_dataset_is_complete_and_checked(s3, remote, tmp_path):
    info = check_dataset(remote, remote_cache=str(tmp_path / "cache"))
    assert set(info["splits"]) == {"train", "val"} and info["shard_hash"] == "xxh64"
    keys = {
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3["S3_ENDPOINT_URL"]).list_objects_v2(
            Bucket="data", Prefix="jargon/"
        )["Contents"]
    }
    assert "jargon/mosaicbert_index.json" in keys and "jargon/train/index.json" in keys
    assert any(k.startswith("jargon/train/b0000000/shard.") for k in keys)


@pytest.mark.slow
def test_pretrain_from_s3_trains_and_resumes_exactly(s3, remote, tmp_path):
    common = [
        "tiny-cpu",
        f"data.path={remote}",
        "duration.steps=6",
        "log.interval=1",
        "eval.interval=0",
        "checkpoint.interval=0",
        "data.num_workers=1",
    ]
    full, first = side_by_side(  # the uninterrupted run and the first part of the split one
        pretrain_cmd(*common, f"output_dir={tmp_path / 'full'}", f"data.remote_cache={tmp_path / 'c1'}"),
        pretrain_cmd(
            *common, f"output_dir={tmp_path / 'split'}", f"data.remote_cache={tmp_path / 'c2'}", "--stop-after", "3"
        ),
        env=s3,
    )
    assert full.returncode == 0, full.stderr[-3000:]
    assert first.returncode == 0, first.stderr[-3000:]
    second = pretrain(*common, f"output_dir={tmp_path / 'split'}", f"data.remote_cache={tmp_path / 'c2'}", env=s3)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-6), (step, a, b)
    assert list((tmp_path / "c1" / "train").rglob("shard.*")), "shards were read through the cache"


def test_two_ranks_read_disjoint_samples_from_s3(s3, remote, tmp_path):
    cfg = {"path": remote, "batch_size": 4, "seed": 3, "ncn": 1, "steps": 5, "remote_cache": str(tmp_path / "cache")}
    ranks = run_loader_ranks(2, cfg, tmp_path, env=s3)
    seen = [{tuple(s) for batch in r["batches"] for s in batch} for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 20 and not seen[0] & seen[1]


@pytest.mark.parametrize(
    "url, message",
    [
        ("s3://data/nothing-here", "holds no finished mosaicbert_ds dataset"),
        ("s3://no-such-bucket/jargon", r"bucket 'no-such-bucket' .*: the bucket does not exist \(NoSuchBucket\)"),
    ],
)
def test_bad_remote_paths_are_one_line_errors(s3, remote, tmp_path, url, message):
    with pytest.raises(UserError, match=message) as caught:
        check_dataset(url, remote_cache=str(tmp_path / "cache"))
    assert len(str(caught.value).splitlines()) == 1


def test_a_bucket_without_split_index_and_an_unreachable_store(s3, remote, tmp_path):
    client = boto3.client("s3", endpoint_url=s3["S3_ENDPOINT_URL"])
    client.copy_object(
        Bucket="data",
        Key="broken/mosaicbert_index.json",
        CopySource={"Bucket": "data", "Key": "jargon/mosaicbert_index.json"},
    )
    for key in [o["Key"] for o in client.list_objects_v2(Bucket="data", Prefix="jargon/tokenizer/")["Contents"]]:
        client.copy_object(
            Bucket="data", Key=key.replace("jargon/", "broken/"), CopySource={"Bucket": "data", "Key": key}
        )
    with pytest.raises(UserError, match=r"cannot read train/index.json"):
        check_dataset("s3://data/broken", remote_cache=str(tmp_path / "c1"))
    dead = {**s3, "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    res = pretrain(
        "tiny-cpu",
        f"data.path={remote}",
        f"output_dir={tmp_path / 'run'}",
        f"data.remote_cache={tmp_path / 'c2'}",
        "--dry-run",
        env=dead,
        timeout=300,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "the endpoint does not answer (EndpointConnectionError)" in res.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_shard_lost_from_the_store_mid_run_stops_cleanly_and_resume_continues(s3, remote, tmp_path):
    client = boto3.client("s3", endpoint_url=s3["S3_ENDPOINT_URL"])
    common = [
        "tiny-cpu",
        "data.path=s3://data/lossy",
        "duration.steps=10",
        "log.interval=1",
        "eval.interval=0",
        "checkpoint.interval=0",
        f"output_dir={tmp_path / 'run'}",
    ]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="data", Prefix="jargon/")["Contents"]]
    for key in keys:
        client.copy_object(
            Bucket="data", Key=key.replace("jargon/", "lossy/", 1), CopySource={"Bucket": "data", "Key": key}
        )
    first = pretrain(*common, f"data.remote_cache={tmp_path / 'c1'}", "--stop-after", "3", env=s3)
    assert first.returncode == 0, first.stderr[-3000:]
    latest = tmp_path / "run" / "checkpoints" / "latest"
    assert latest.read_text().strip() == "step_0000003"

    lost = sorted(k for k in keys if k.startswith("jargon/train/b") and k.endswith(".zstd"))[-1]
    saved = client.get_object(Bucket="data", Key=lost.replace("jargon/", "lossy/", 1))["Body"].read()
    client.delete_object(Bucket="data", Key=lost.replace("jargon/", "lossy/", 1))
    second = pretrain(*common, f"data.remote_cache={tmp_path / 'c2'}", env=s3)  # fresh cache: must download
    assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr[-3000:]
    line = second.stderr.strip().splitlines()[-1]
    assert "shard s3://data/lossy/train/" in line and lost.rsplit("/", 1)[-1] in line, second.stderr[-2000:]
    assert latest.read_text().strip() == "step_0000003"  # the finished checkpoint is intact

    client.put_object(Bucket="data", Key=lost.replace("jargon/", "lossy/", 1), Body=saved)
    third = pretrain(*common, f"data.remote_cache={tmp_path / 'c2'}", env=s3)
    assert third.returncode == 0, third.stderr[-3000:]
    assert sorted(losses(tmp_path / "run"))[-1] == 10


# ---- a store that checks credentials (moto with IAM authentication) ----------------------------
AWS_SETTINGS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "S3_ENDPOINT_URL",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)
SETUP_REQUESTS = 3
"""Requests the server answers unsigned (create the admin user, its policy, its key); then it checks every one."""
# The roles in AWS's IAM actions, each followed by the operation names that moto checks instead
# (moto 5.2.x authorises some requests by their operation name: HeadBucket and ListObjectsV2 where
# AWS checks s3:ListBucket, HeadObject where it checks s3:GetObject, DeleteObjects for
# s3:DeleteObject). Granting both keeps each role's meaning on AWS and on every moto release.
READ = ["s3:ListBucket", "s3:HeadBucket", "s3:ListObjectsV2", "s3:GetObject", "s3:HeadObject"]
ROLES = {
    "writer": ["s3:*"],
    "reader": READ,
    "replacer": [*READ, "s3:DeleteObject", "s3:DeleteObjects"],
}
UNKNOWN_KEY = "AKIAUNKNOWNKEY000000"


def _policy(actions: list[str]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]})


def use_env(mp: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Exactly `env` as the AWS settings of this process (nothing left from the shell or the s3 fixture)."""
    for name in AWS_SETTINGS:
        mp.delenv(name, raising=False)
    for name, value in env.items():
        mp.setenv(name, value)


def run_cli(*args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in AWS_SETTINGS}
    return subprocess.run(
        [sys.executable, "-m", "mosaicbert_ds.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, "CUDA_VISIBLE_DEVICES": "", **env},
    )


class Vault:
    """A moto server that enforces IAM signatures and policies, with bucket 'vault' and a key per role."""

    def __init__(self, endpoint: str, keys: dict[str, dict[str, str]], no_file: str) -> None:
        self.endpoint, self.keys, self.no_file = endpoint, keys, no_file

    def env(self, role: str = "writer", **changes: str | None) -> dict[str, str]:
        """The complete AWS environment for `role`'s key, with `changes` (None removes a variable);
        no ~/.aws files and no instance metadata, so a removed key means no credentials at all."""
        env = {
            "AWS_ACCESS_KEY_ID": self.keys[role]["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": self.keys[role]["SecretAccessKey"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_SHARED_CREDENTIALS_FILE": self.no_file,
            "AWS_CONFIG_FILE": self.no_file,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def client(self, role: str = "writer"):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.keys[role]["AccessKeyId"],
            aws_secret_access_key=self.keys[role]["SecretAccessKey"],
        )

    def keys_under(self, prefix: str) -> dict[str, bytes]:
        client = self.client()
        listed = client.list_objects_v2(Bucket="vault", Prefix=prefix).get("Contents", [])
        return {o["Key"]: client.get_object(Bucket="vault", Key=o["Key"])["Body"].read() for o in listed}


@pytest.fixture(scope="module")
def vault(tmp_path_factory) -> Iterator[Vault]:
    from botocore.exceptions import ClientError

    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_REQUESTS)) as endpoint:

        def iam(key: dict[str, str]):
            return boto3.client(
                "iam",
                endpoint_url=endpoint,
                region_name="us-east-1",
                aws_access_key_id=key["AccessKeyId"],
                aws_secret_access_key=key["SecretAccessKey"],
            )

        first = iam({"AccessKeyId": "setup", "SecretAccessKey": "setup"})
        first.create_user(UserName="admin")
        first.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=_policy(["*"]))
        keys = {"admin": first.create_access_key(UserName="admin")["AccessKey"]}
        admin = iam(keys["admin"])
        for role, actions in ROLES.items():
            admin.create_user(UserName=role)
            admin.put_user_policy(UserName=role, PolicyName="s3", PolicyDocument=_policy(actions))
            keys[role] = admin.create_access_key(UserName=role)["AccessKey"]
        store = Vault(endpoint, keys, str(tmp_path_factory.mktemp("no-aws-files") / "absent"))
        store.client().create_bucket(Bucket="vault")
        stranger = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=UNKNOWN_KEY,
            aws_secret_access_key="x",
        )
        with pytest.raises(ClientError, match="InvalidAccessKeyId"):  # the server checks keys from here on
            stranger.list_objects_v2(Bucket="vault")
        yield store


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(documents as JSONL, tokenizer folder) for conversions into the vault."""
    return write_jsonl(tmp_path_factory.mktemp("vault-docs") / "docs.jsonl", jargon_docs(300)), tokenizer_dir(
        tmp_path_factory
    )


def convert_config(url: str, stage: Path, corpus: tuple[Path, Path], **options):
    from mosaicbert_ds.data.convert import ConvertConfig
    from mosaicbert_ds.data.sources import SourceConfig

    settings = dict(max_seq_len=64, val_docs=32, block_docs=200, shard_size="16kb", workers=1, progress=False)
    return ConvertConfig(
        source=SourceConfig(paths=[str(corpus[0])]),
        out=url,
        stage=str(stage),
        tokenizer=str(corpus[1]),
        **{**settings, **options},
    )


@pytest.fixture(scope="module")
def vault_dataset(vault, corpus, tmp_path_factory) -> str:
    """A dataset converted and uploaded to s3://vault/ds with the writer's key."""
    from mosaicbert_ds.data.convert import convert_corpus

    with pytest.MonkeyPatch.context() as mp:
        use_env(mp, vault.env("writer"))
        convert_corpus(convert_config("s3://vault/ds", tmp_path_factory.mktemp("vault-stage") / "ds", corpus))
    return "s3://vault/ds"


BAD_SETTINGS = {  # case: (changes to the writer's environment, bucket, what the line says)
    "wrong secret key": (
        {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
        "vault",
        "the secret key does not match access key {key} (SignatureDoesNotMatch); check AWS_SECRET_ACCESS_KEY",
    ),
    "unknown access key": (
        {"AWS_ACCESS_KEY_ID": UNKNOWN_KEY},
        "vault",
        f"the store does not know access key {UNKNOWN_KEY} (InvalidAccessKeyId); check AWS_ACCESS_KEY_ID",
    ),
    "no credentials": (
        {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
        "vault",
        "no AWS credentials found",
    ),
    "missing bucket": ({}, "no-such-bucket", "the bucket does not exist (NoSuchBucket); check the bucket name"),
    "dead endpoint": (
        {"S3_ENDPOINT_URL": "DEAD"},
        "vault",
        "the endpoint does not answer (EndpointConnectionError); check S3_ENDPOINT_URL",
    ),
    "malformed endpoint": (
        {"S3_ENDPOINT_URL": "127.0.0.1:9000"},
        "vault",
        "S3_ENDPOINT_URL='127.0.0.1:9000' is not a valid URL",
    ),
}


def bad_settings(vault: Vault, case: str) -> tuple[dict[str, str], str, str]:
    """(environment, bucket, expected part of the line) for a BAD_SETTINGS case."""
    changes, bucket, expected = BAD_SETTINGS[case]
    if changes.get("S3_ENDPOINT_URL") == "DEAD":  # a port nothing listens on
        changes = {**changes, "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    return vault.env(**changes), bucket, expected.format(key=vault.keys["writer"]["AccessKeyId"])


def test_the_vault_serves_the_right_keys(vault, vault_dataset, tmp_path, monkeypatch):
    for role in ("writer", "reader"):
        use_env(monkeypatch, vault.env(role))
        info = check_dataset(vault_dataset, remote_cache=str(tmp_path / role))
        assert set(info["splits"]) == {"train", "val"}
    assert "ds/mosaicbert_index.json" in vault.keys_under("ds/")


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_store_settings_stop_reading_with_one_line(vault, vault_dataset, tmp_path, monkeypatch, case):
    env, bucket, expected = bad_settings(vault, case)
    url = vault_dataset.replace("s3://vault/", f"s3://{bucket}/")
    use_env(monkeypatch, env)
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        check_dataset(url, remote_cache=str(tmp_path / "cache"))
    line = str(caught.value)
    assert len(line.splitlines()) == 1 and line.startswith(f"cannot read {url} (bucket {bucket!r} at "), line
    assert expected in line, line
    assert time.monotonic() - started < 20, "the store's problem is reported without long retries"


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_store_settings_stop_convert_before_it_converts(vault, corpus, tmp_path, monkeypatch, case):
    from mosaicbert_ds.data.convert import convert_corpus

    env, bucket, expected = bad_settings(vault, case)
    url = f"s3://{bucket}/fresh"
    use_env(monkeypatch, env)
    with pytest.raises(UserError) as caught:
        convert_corpus(convert_config(url, tmp_path / "stage", corpus))
    line = str(caught.value)
    assert len(line.splitlines()) == 1 and line.startswith(f"cannot upload to {url} (bucket {bucket!r} at "), line
    assert expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing was converted or staged"
    assert vault.keys_under("fresh/") == {}


def test_the_commands_print_one_line_and_exit_2_before_any_work(vault, vault_dataset, corpus, tmp_path):
    docs, tok = corpus
    key = vault.keys["writer"]["AccessKeyId"]
    convert = run_cli(
        "convert",
        str(docs),
        "--tokenizer",
        str(tok),
        "--out",
        "s3://vault/cli",
        "--stage",
        str(tmp_path / "stage"),
        "--max-seq-len",
        "64",
        "--quiet",
        env=vault.env(AWS_SECRET_ACCESS_KEY="not-the-secret"),
    )
    assert convert.returncode == 2 and "Traceback" not in convert.stderr, convert.stderr[-2000:]
    assert convert.stderr.strip().splitlines() == [
        f"mosaicbert-ds convert: error: cannot upload to s3://vault/cli (bucket 'vault' at {vault.endpoint}): "
        f"the secret key does not match access key {key} (SignatureDoesNotMatch); check AWS_SECRET_ACCESS_KEY"
    ]
    assert not (tmp_path / "stage").exists() and vault.keys_under("cli/") == {}

    train = run_cli(
        "pretrain",
        "tiny-cpu",
        f"data.path={vault_dataset}",
        f"output_dir={tmp_path / 'run'}",
        f"data.remote_cache={tmp_path / 'cache'}",
        env=vault.env(AWS_ACCESS_KEY_ID=UNKNOWN_KEY),
    )
    assert train.returncode == 2 and "Traceback" not in train.stderr, train.stderr[-2000:]
    assert train.stderr.strip().splitlines() == [
        f"mosaicbert-ds pretrain: error: cannot read {vault_dataset} (bucket 'vault' at {vault.endpoint}): "
        f"the store does not know access key {UNKNOWN_KEY} (InvalidAccessKeyId); check AWS_ACCESS_KEY_ID "
        "(or AWS_PROFILE) and that S3_ENDPOINT_URL is the store the key belongs to"
    ]
    assert not (tmp_path / "run").exists(), "the run stopped before it wrote anything"

    dry = run_cli(
        "pretrain",
        "tiny-cpu",
        "data.path=s3://no-such-bucket/ds",
        f"output_dir={tmp_path / 'run'}",
        f"data.remote_cache={tmp_path / 'cache'}",
        "--dry-run",
        env=vault.env(),
    )
    assert dry.returncode == 2 and "Traceback" not in dry.stderr, dry.stderr[-2000:]
    assert dry.stderr.strip().splitlines() == [
        f"mosaicbert-ds pretrain: error: cannot read s3://no-such-bucket/ds (bucket 'no-such-bucket' at "
        f"{vault.endpoint}): the bucket does not exist (NoSuchBucket); check the bucket name in the URL and "
        "S3_ENDPOINT_URL"
    ]


def test_a_refused_upload_keeps_the_staged_copy_and_publishes_nothing(vault, corpus, tmp_path, monkeypatch, capsys):
    from mosaicbert_ds.data.convert import convert_corpus
    from mosaicbert_ds.data.info import INDEX_NAME, PARTIAL_MARKER

    vault.client().put_object(Bucket="vault", Key="ro/notes.txt", Body=b"the user's own file")
    (tmp_path / "keep.txt").write_text("the user's own file")
    stage, url = tmp_path / "stage", "s3://vault/ro"
    use_env(monkeypatch, vault.env("reader"))  # may list and read the bucket, not write to it
    with pytest.raises(UserError) as caught:
        convert_corpus(convert_config(url, stage, corpus))
    line = str(caught.value)
    assert len(line.splitlines()) == 1 and line.startswith(f"cannot upload to {url} (bucket 'vault' at "), line
    assert f"access key {vault.keys['reader']['AccessKeyId']} was denied (AccessDenied)" in line, line
    assert "s3:PutObject" in line and f"the converted copy in {stage} is finished and kept" in line, line

    assert (stage / INDEX_NAME).is_file() and not (stage / PARTIAL_MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "stage"], "no .partial folder is left"
    check_dataset(str(stage), hashes=True)
    assert set(vault.keys_under("ro/")) == {"ro/notes.txt"}
    with pytest.raises(UserError, match=f"{url} holds no finished mosaicbert_ds dataset"):
        check_dataset(url, remote_cache=str(tmp_path / "c1"))

    capsys.readouterr()
    use_env(monkeypatch, vault.env("writer"))
    convert_corpus(convert_config(url, stage, corpus))  # the re-run uploads the staged copy as it is
    out = capsys.readouterr().out
    assert "already holds this dataset; nothing to do" in out and f"files to {url}" in out, out
    assert set(check_dataset(url, remote_cache=str(tmp_path / "c2"))["splits"]) == {"train", "val"}
    assert vault.keys_under("ro/")["ro/notes.txt"] == b"the user's own file"
    assert (tmp_path / "keep.txt").read_text() == "the user's own file"


def test_another_dataset_replaces_a_remote_one_only_with_overwrite(vault, corpus, tmp_path, monkeypatch, capsys):
    from mosaicbert_ds.data.convert import convert_corpus
    from mosaicbert_ds.data.info import INDEX_NAME

    url, index_key = "s3://vault/swap", f"swap/{INDEX_NAME}"
    use_env(monkeypatch, vault.env("writer"))
    convert_corpus(convert_config(url, tmp_path / "first", corpus))
    capsys.readouterr()
    convert_corpus(convert_config(url, tmp_path / "first", corpus))
    assert f"{url} already holds this dataset; nothing uploaded" in capsys.readouterr().out
    published = vault.keys_under("swap/")[index_key]

    other = convert_config(url, tmp_path / "other", corpus, val_docs=16)
    with pytest.raises(UserError, match=f"^{url} already holds a different mosaicbert_ds dataset; pass --overwrite"):
        convert_corpus(other)
    assert vault.keys_under("swap/")[index_key] == published

    use_env(monkeypatch, vault.env("replacer"))  # may delete the old index, not upload the new files
    with pytest.raises(UserError, match=r"was denied \(AccessDenied\)"):
        convert_corpus(convert_config(url, tmp_path / "other", corpus, val_docs=16, overwrite=True))
    assert index_key not in vault.keys_under("swap/"), "no index over a mix of old and new shards"
    with pytest.raises(UserError, match="holds no finished mosaicbert_ds dataset"):
        check_dataset(url, remote_cache=str(tmp_path / "c1"))

    use_env(monkeypatch, vault.env("writer"))
    convert_corpus(convert_config(url, tmp_path / "other", corpus, val_docs=16, overwrite=True))
    assert check_dataset(url, remote_cache=str(tmp_path / "c2"))["splits"]["val"]["samples"] == 16
