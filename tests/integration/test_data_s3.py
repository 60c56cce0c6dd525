"""Datasets in object storage, against a real S3-compatible server (moto's) on 127.0.0.1.

The server is started and stopped here; credentials and endpoint reach mosaicml-streaming the
way it reads them (AWS_* variables and S3_ENDPOINT_URL).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e .[dev])")
boto3 = pytest.importorskip("boto3")

from mosaicbert_ds.data.info import check_dataset  # noqa: E402
from mosaicbert_ds.errors import UserError  # noqa: E402
from tests.helpers.data import jargon_docs, tokenizer_dir, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RANK_SCRIPT = ROOT / "tests" / "helpers" / "loader_rank.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server in its own process; yields the environment that points at it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("moto server did not start")
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"]).create_bucket(Bucket="data")
        yield env
    finally:
        for k, v in locals().get("old", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        server.wait(timeout=30)


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


def pretrain(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mosaicbert_ds.cli", "pretrain", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env},
    )


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/train"] for r in rows if "loss/train" in r}


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
    full = pretrain(*common, f"output_dir={tmp_path / 'full'}", f"data.remote_cache={tmp_path / 'c1'}", env=s3)
    assert full.returncode == 0, full.stderr[-3000:]
    first = pretrain(
        *common, f"output_dir={tmp_path / 'split'}", f"data.remote_cache={tmp_path / 'c2'}", "--stop-after", "3", env=s3
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = pretrain(*common, f"output_dir={tmp_path / 'split'}", f"data.remote_cache={tmp_path / 'c2'}", env=s3)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-6), (step, a, b)
    assert list((tmp_path / "c1" / "train").rglob("shard.*")), "shards were read through the cache"


def test_two_ranks_read_disjoint_samples_from_s3(s3, remote, tmp_path):
    port = free_port()
    procs, outs = [], []
    for rank in range(2):
        out = tmp_path / f"rank{rank}.json"
        cfg = {
            "path": remote,
            "batch_size": 4,
            "seed": 3,
            "ncn": 1,
            "steps": 5,
            "out": str(out),
            "remote_cache": str(tmp_path / "cache"),
        }
        env = {
            **os.environ,
            **s3,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(RANK_SCRIPT), json.dumps(cfg)], env=env, stderr=subprocess.PIPE, text=True
            )
        )
        outs.append(out)
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    seen = [{tuple(s) for batch in json.loads(o.read_text())["batches"] for s in batch} for o in outs]
    assert len(seen[0]) == len(seen[1]) == 20 and not seen[0] & seen[1]


@pytest.mark.parametrize(
    "url, message",
    [
        ("s3://data/nothing-here", "holds no finished mosaicbert_ds dataset"),
        ("s3://no-such-bucket/jargon", "holds no finished mosaicbert_ds dataset"),
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
    assert "holds no finished mosaicbert_ds dataset" in res.stderr.strip().splitlines()[-1]


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
