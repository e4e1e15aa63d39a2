"""Limits reach boto3 as the modelled exception: a server at its sandbox limit answers
ServiceQuotaExceededException (HTTP 402), which botocore does not retry."""

import uuid

import pytest

from conftest import ROLE, start_berth, wait_status, zip_of


@pytest.fixture(scope="module")
def small_berth():
    yield from start_berth(["--max-sandboxes", "1"])


def test_a_server_at_its_sandbox_limit_raises_service_quota_exceeded(small_berth):
    control = small_berth.client("bedrock-agentcore-control")
    data = small_berth.client("bedrock-agentcore")
    key = f"agents/{uuid.uuid4()}.zip"
    # Commands need no agent process: any entry point will do.
    small_berth.put_object("code", key, zip_of({"main.py": "print('unused')\n"}))
    created = control.create_agent_runtime(
        agentRuntimeName="q_" + uuid.uuid4().hex[:12],
        agentRuntimeArtifact={"codeConfiguration": {
            "code": {"s3": {"bucket": "code", "prefix": key}},
            "runtime": "PYTHON_3_11", "entryPoint": ["main.py"]}},
        roleArn=ROLE, networkConfiguration={"networkMode": "PUBLIC"},
    )
    assert wait_status(control, created["agentRuntimeId"])["status"] == "READY"
    arn = created["agentRuntimeArn"]

    def run(session):
        out = data.invoke_agent_runtime_command(
            agentRuntimeArn=arn, runtimeSessionId=session, body={"command": "echo up"})
        return [e["chunk"] for e in out["stream"] if "chunk" in e]

    first = f"quota-one-{uuid.uuid4()}"
    events = run(first)
    assert events[-1]["contentStop"] == {"exitCode": 0, "status": "COMPLETED"}
    # The first session's sandbox keeps running (idle timeout 900 s): no room for another.
    with pytest.raises(data.exceptions.ServiceQuotaExceededException) as e:
        run(f"quota-two-{uuid.uuid4()}")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 402
    assert e.value.response["ResponseMetadata"]["RetryAttempts"] == 0
    # Stopping the first makes room.
    data.stop_runtime_session(agentRuntimeArn=arn, runtimeSessionId=first)
    assert run(f"quota-three-{uuid.uuid4()}")[-1]["contentStop"]["exitCode"] == 0
