"""The same flow with the store, and an adapter, in S3: moto's real S3 server on loopback."""

import contextlib
import json
import os

import boto3
import pytest
import s3fs

from common.adapters import WEIGHTS_NAME
from lorafleet.redis_server import free_port
from tests.conftest import lorafleet
from tests.helpers import decode_video

pytestmark = pytest.mark.integration
BUCKET = "fleet"


@pytest.fixture
def s3_env(fleet_env):
    """A moto S3 server on 127.0.0.1 and the environment that points s3fs and boto3 at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        **fleet_env,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "LORAFLEET_STORE_URL": f"s3://{BUCKET}/runs",
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    yield env, client
    server.stop()


def test_submit_wait_with_an_s3_store(s3_env, start_worker, tmp_path, tiny):
    env, s3 = s3_env
    s3.upload_file(os.path.join(tiny["style"], WEIGHTS_NAME), BUCKET, f"adapters/style/{WEIGHTS_NAME}")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps(
            {
                "id": "s3 adapter",
                "prompt": "a cat",
                "adapters": [f"s3://{BUCKET}/adapters/style"],
                "seed": 1,
                "lora_scale": [0.5, 1],
            }
        )
        + "\n"
        + json.dumps({"id": "store-relative adapter", "prompt": "a dog", "adapters": ["../adapters/style"], "seed": 2})
        + "\n"
    )
    # A store-relative adapter must stay inside the store: "../" is refused, naming the line.
    refused = lorafleet("submit", str(jobs), env=env)
    assert refused.returncode == 2 and 'line 2: adapter "../adapters/style" not found' in refused.stderr

    s3.upload_file(os.path.join(tiny["subject"], WEIGHTS_NAME), BUCKET, f"runs/adapters/subject/{WEIGHTS_NAME}")
    jobs.write_text(jobs.read_text().replace("../adapters/style", "adapters/subject"))
    start_worker(env)
    result = lorafleet("submit", str(jobs), "--wait", "--batch", "s3", env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    # The S3 adapter was downloaded once for this host, into the adapter cache, by content hash.
    cached = os.listdir(env["LORAFLEET_ADAPTER_CACHE_DIR"])  # <sha256>.safetensors: kept by content, not path
    assert len(cached) == 2 and all(
        len(name.removesuffix(".safetensors")) == 64 for name in cached
    )  # style (S3), subject (store)

    manifest = s3.get_object(Bucket=BUCKET, Key="runs/batches/s3/manifest.jsonl")["Body"].read().decode()
    entries = [json.loads(line) for line in manifest.splitlines()]
    assert [e["status"] for e in entries] == ["done"] * 3
    for entry in entries:
        assert entry["video"] == f"s3://{BUCKET}/runs/videos/{entry['key']}.mp4"
        local = tmp_path / f"{entry['key']}.mp4"
        s3.download_file(BUCKET, f"runs/videos/{entry['key']}.mp4", str(local))
        assert decode_video(str(local)).shape == (9, 16, 16, 3)
        metadata = json.loads(s3.get_object(Bucket=BUCKET, Key=f"runs/videos/{entry['key']}.json")["Body"].read())
        assert metadata["key"] == entry["key"]


def test_prune_on_an_s3_store(s3_env):
    from common.store import Store
    from tests.integration.test_operator import check_prune

    env, _ = s3_env
    # moto keeps its buckets process-wide: a prefix of this test's own, not the other tests' batches
    env = {**env, "LORAFLEET_STORE_URL": f"s3://{BUCKET}/prune"}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})  # this process's s3fs too
    try:
        check_prune(env, Store(env["LORAFLEET_STORE_URL"]))
    finally:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
            os.environ.pop(name, None)


@contextlib.contextmanager
def delete_denied(env: dict, resource: str):
    """Credentials of an IAM user of moto's that may do anything in S3 but delete `resource` (an
    ARN), with moto checking every request's rights meanwhile: AccessDenied, as a bucket policy or
    an IAM role gives it on AWS."""
    import moto.settings

    iam = boto3.client(
        "iam", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    iam.create_user(UserName="pruner")
    statements = [
        {"Effect": "Allow", "Action": ["s3:*", "iam:*"], "Resource": "*"},
        {"Effect": "Deny", "Action": "s3:DeleteObject", "Resource": resource},
    ]
    iam.put_user_policy(
        UserName="pruner",
        PolicyName="no-delete",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}),
    )
    key = iam.create_access_key(UserName="pruner")["AccessKey"]
    checking = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # moto checks rights from now on (the server runs in this process)
    try:
        yield {**env, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = checking


def test_a_prune_whose_delete_is_refused_keeps_the_batch_and_a_second_prune_finishes(s3_env):
    import time

    from common.store import Store
    from tests.helpers import plant_batch

    env, s3 = s3_env
    env = {**env, "LORAFLEET_STORE_URL": f"s3://{BUCKET}/refused"}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})  # this process's s3fs too
    s3fs.S3FileSystem.clear_instance_cache()  # not an earlier test's, on its server's port
    try:
        store = Store(env["LORAFLEET_STORE_URL"])
        kept, old = "e" * 64, "f" * 64
        plant_batch(store, "old", [old, kept])
        time.sleep(1.1)  # the store's times are in whole seconds
        cutoff = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with delete_denied(env, f"arn:aws:s3:::{BUCKET}/refused/videos/{kept}.mp4") as denied:
            refused = lorafleet("prune", "--before", cutoff, env=denied)
        assert refused.returncode == 6, refused.stdout + refused.stderr
        assert f"cannot delete s3://{BUCKET}/refused/videos/{kept}.mp4" in refused.stdout, refused.stdout
        assert "AccessDenied" in refused.stdout or "Access Denied" in refused.stdout, refused.stdout
        assert "the 1 batch(es) that named them are kept" in refused.stdout and "Traceback" not in refused.stderr
        assert not s3_exists(s3, f"refused/videos/{old}.mp4")  # what could go went
        assert s3_exists(s3, "refused/batches/old/manifest.jsonl")  # the batch stays: a second prune finds it

        again = lorafleet("prune", "--before", cutoff, env=env)  # the rights fixed
        assert again.returncode == 0, again.stdout + again.stderr
        assert not s3_exists(s3, f"refused/videos/{kept}.mp4") and not s3_exists(
            s3, "refused/batches/old/manifest.jsonl"
        )
    finally:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
            os.environ.pop(name, None)


def s3_exists(s3, key: str) -> bool:
    """Whether an object is in the test's bucket, as S3 itself says."""
    return s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount", 0) > 0
