"""The control plane (bedrock-agentcore-control) through unmodified boto3, over HTTPS
with SigV4 — runtimes, versions, endpoints, and the exception class for each bad input."""

import uuid

import botocore.exceptions
import pytest

from conftest import ACCOUNT, REGION, ROLE, wait_status, zip_of

AGENT = """
from bedrock_agentcore import BedrockAgentCoreApp
app = BedrockAgentCoreApp()

@app.entrypoint
def invoke(payload, context):
    return {"echo": payload}

if __name__ == "__main__":
    app.run()
"""


def code_artifact(berth, runtime="PYTHON_3_11", key=None):
    key = key or f"agents/{uuid.uuid4()}.zip"
    berth.put_object("code", key, zip_of({"main.py": AGENT}))
    return {
        "codeConfiguration": {
            "code": {"s3": {"bucket": "code", "prefix": key}},
            "runtime": runtime,
            "entryPoint": ["main.py"],
        }
    }


def name():
    return "rt_" + uuid.uuid4().hex[:12]


def test_create_get_update_list_delete(berth, control):
    n = name()
    created = control.create_agent_runtime(
        agentRuntimeName=n,
        agentRuntimeArtifact=code_artifact(berth),
        roleArn=ROLE,
        networkConfiguration={"networkMode": "PUBLIC"},
        environmentVariables={"GREETING": "hello"},
        lifecycleConfiguration={"idleRuntimeSessionTimeout": 120, "maxLifetime": 3600},
    )
    rid = created["agentRuntimeId"]
    assert rid.startswith(n + "-") and len(rid) == len(n) + 11
    assert created["agentRuntimeArn"] == f"arn:aws:bedrock-agentcore:{REGION}:{ACCOUNT}:runtime/{rid}"
    assert created["agentRuntimeVersion"] == "1"
    assert created["status"] in ("CREATING", "READY")

    got = wait_status(control, rid)
    assert got["status"] == "READY", got.get("failureReason")
    assert got["agentRuntimeName"] == n
    assert got["environmentVariables"] == {"GREETING": "hello"}
    assert got["lifecycleConfiguration"] == {"idleRuntimeSessionTimeout": 120, "maxLifetime": 3600}
    assert got["agentRuntimeArtifact"]["codeConfiguration"]["entryPoint"] == ["main.py"]
    assert got["roleArn"] == ROLE

    updated = control.update_agent_runtime(
        agentRuntimeId=rid,
        agentRuntimeArtifact=code_artifact(berth),
        roleArn=ROLE,
        networkConfiguration={"networkMode": "PUBLIC"},
        environmentVariables={"GREETING": "bonjour"},
    )
    assert updated["agentRuntimeVersion"] == "2"
    assert wait_status(control, rid)["status"] == "READY"
    # Versions are immutable: version 1 still says hello.
    v1 = control.get_agent_runtime(agentRuntimeId=rid, agentRuntimeVersion="1")
    assert v1["environmentVariables"] == {"GREETING": "hello"}
    assert control.get_agent_runtime(agentRuntimeId=rid)["environmentVariables"] == {"GREETING": "bonjour"}

    versions = control.list_agent_runtime_versions(agentRuntimeId=rid)["agentRuntimes"]
    assert sorted(v["agentRuntimeVersion"] for v in versions) == ["1", "2"]
    listed = [r["agentRuntimeId"] for r in control.list_agent_runtimes()["agentRuntimes"]]
    assert rid in listed

    # The DEFAULT endpoint follows the latest version; a named one pins its version.
    default = control.get_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="DEFAULT")
    assert default["liveVersion"] == "2"
    pinned = control.create_agent_runtime_endpoint(agentRuntimeId=rid, name="stable", agentRuntimeVersion="1")
    assert pinned["targetVersion"] == "1"
    assert pinned["agentRuntimeEndpointArn"].endswith(f"runtime/{rid}/runtime-endpoint/stable")
    names = {e["name"] for e in control.list_agent_runtime_endpoints(agentRuntimeId=rid)["runtimeEndpoints"]}
    assert names == {"DEFAULT", "stable"}
    control.delete_agent_runtime_endpoint(agentRuntimeId=rid, endpointName="stable")

    deleted = control.delete_agent_runtime(agentRuntimeId=rid)
    assert deleted["agentRuntimeId"] == rid
    with pytest.raises(control.exceptions.ResourceNotFoundException):
        # Deletion may take a moment (status DELETING); it ends in not-found.
        for _ in range(600):
            control.get_agent_runtime(agentRuntimeId=rid)
            __import__("time").sleep(0.1)


def test_pagination_walks_every_runtime(berth, control):
    ids = set()
    for _ in range(3):
        ids.add(control.create_agent_runtime(
            agentRuntimeName=name(), agentRuntimeArtifact=code_artifact(berth), roleArn=ROLE,
            networkConfiguration={"networkMode": "PUBLIC"},
        )["agentRuntimeId"])
    seen = set()
    for page in control.get_paginator("list_agent_runtimes").paginate(PaginationConfig={"PageSize": 1}):
        assert len(page["agentRuntimes"]) <= 1
        seen.update(r["agentRuntimeId"] for r in page["agentRuntimes"])
    assert ids <= seen


def test_a_missing_zip_or_managed_runtime_fails_creation_with_a_reason(berth, control):
    missing = control.create_agent_runtime(
        agentRuntimeName=name(),
        agentRuntimeArtifact={"codeConfiguration": {
            "code": {"s3": {"bucket": "code", "prefix": "no/such.zip"}},
            "runtime": "PYTHON_3_11", "entryPoint": ["main.py"]}},
        roleArn=ROLE, networkConfiguration={"networkMode": "PUBLIC"},
    )
    got = wait_status(control, missing["agentRuntimeId"])
    assert got["status"] == "CREATE_FAILED"
    assert "no/such.zip" in got["failureReason"]

    lacking = control.create_agent_runtime(
        agentRuntimeName=name(), agentRuntimeArtifact=code_artifact(berth, runtime="PYTHON_3_14"),
        roleArn=ROLE, networkConfiguration={"networkMode": "PUBLIC"},
    )
    got = wait_status(control, lacking["agentRuntimeId"])
    assert got["status"] == "CREATE_FAILED"
    assert "PYTHON_3_14" in got["failureReason"]


def test_bad_input_raises_the_modelled_exception_class(berth, control):
    with pytest.raises(control.exceptions.ValidationException) as e:
        control.create_agent_runtime(
            agentRuntimeName="1-not-a-valid-name", agentRuntimeArtifact=code_artifact(berth),
            roleArn=ROLE, networkConfiguration={"networkMode": "PUBLIC"},
        )
    assert e.value.response["reason"] == "FieldValidationFailed"
    assert [f["name"] for f in e.value.response["fieldList"]] == ["agentRuntimeName"]

    with pytest.raises(control.exceptions.ValidationException) as e:
        control.create_agent_runtime(
            agentRuntimeName=name(), agentRuntimeArtifact=code_artifact(berth), roleArn=ROLE,
            networkConfiguration={"networkMode": "PUBLIC"},
            lifecycleConfiguration={"idleRuntimeSessionTimeout": 2_000_000},  # max 1209600; botocore checks only the min
        )
    assert "lifecycleConfiguration.idleRuntimeSessionTimeout" in [f["name"] for f in e.value.response["fieldList"]]

    with pytest.raises(control.exceptions.ResourceNotFoundException):
        control.get_agent_runtime(agentRuntimeId="nosuch-AbCdE12345")

    n = name()
    control.create_agent_runtime(
        agentRuntimeName=n, agentRuntimeArtifact=code_artifact(berth), roleArn=ROLE,
        networkConfiguration={"networkMode": "PUBLIC"},
    )
    with pytest.raises(control.exceptions.ConflictException):
        control.create_agent_runtime(
            agentRuntimeName=n, agentRuntimeArtifact=code_artifact(berth), roleArn=ROLE,
            networkConfiguration={"networkMode": "PUBLIC"},
        )


def test_the_same_client_token_is_idempotent(berth, control):
    token = str(uuid.uuid4())
    kw = dict(agentRuntimeName=name(), agentRuntimeArtifact=code_artifact(berth), roleArn=ROLE,
              networkConfiguration={"networkMode": "PUBLIC"}, clientToken=token)
    first = control.create_agent_runtime(**kw)
    again = control.create_agent_runtime(**kw)
    assert again["agentRuntimeId"] == first["agentRuntimeId"]
    with pytest.raises(control.exceptions.ValidationException) as e:
        control.create_agent_runtime(**{**kw, "description": "different"})
    assert e.value.response["reason"] == "IdempotentParameterMismatchException"


def test_a_wrong_signature_or_unknown_key_is_refused(berth):
    wrong = berth.client("bedrock-agentcore-control", secret="x" * 40)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        wrong.list_agent_runtimes()
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert e.value.response["Error"]["Code"] == "InvalidSignatureException"

    unknown = berth.client("bedrock-agentcore-control", key="BKIAUNKNOWNUNKNOWN00")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        unknown.list_agent_runtimes()
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert e.value.response["Error"]["Code"] == "UnrecognizedClientException"


def test_plain_https_without_trusting_the_ca_fails(berth):
    """The generated CA is what clients must trust: without it TLS verification fails."""
    import boto3
    client = boto3.client("bedrock-agentcore-control", endpoint_url=berth.url, region_name=REGION,
                          aws_access_key_id=berth.access_key_id,
                          aws_secret_access_key=berth.secret_access_key)
    with pytest.raises(botocore.exceptions.SSLError):
        client.list_agent_runtimes()
