"""The data plane (bedrock-agentcore) through unmodified boto3, over HTTPS with SigV4:
InvokeAgentRuntime (JSON and streamed SSE), per-session state, RuntimeClientError,
InvokeAgentRuntimeCommand's event stream as botocore decodes it, timeouts,
StopRuntimeSession and resume, and the exception class for unknown runtimes and sessions.

The agent is a real `BedrockAgentCoreApp`. The sandbox's python cannot see any venv, so
bedrock-agentcore and its dependencies are vendored into the code zip with
`pip install --target`, once, under `target/tmp/` (shared with the Rust tests).
"""

import io
import json
import uuid
import zipfile

import pytest

from conftest import REGION, ROLE, agent_zip, host_python, wait_status

AGENT = '''import os
import time

from bedrock_agentcore import BedrockAgentCoreApp

app = BedrockAgentCoreApp()
COUNT = 0


def stream(release):
    yield {"i": 0}
    while not os.path.exists(release):
        time.sleep(0.05)
    yield {"i": 1}


@app.entrypoint
def invoke(payload, context):
    global COUNT
    action = payload.get("action")
    if action == "count":
        COUNT += 1
        return {"count": COUNT}
    if action == "stream":
        return stream(payload["release"])
    if action == "fail":
        raise RuntimeError("the agent failed on purpose")
    return {"echo": payload, "session": context.session_id,
            "headers": dict(context.request_headers or {})}


if __name__ == "__main__":
    app.run()
'''


@pytest.fixture(scope="module")
def runtime(berth, control):
    """A READY runtime running the agent: (arn, id)."""
    python, managed = host_python()
    if python is None:
        pytest.skip("the host has no /usr/bin/python3.N for the sandbox")
    key = f"agents/{uuid.uuid4()}.zip"
    berth.put_object("code", key, agent_zip(python, AGENT))
    created = control.create_agent_runtime(
        agentRuntimeName="dp_" + uuid.uuid4().hex[:12],
        agentRuntimeArtifact={"codeConfiguration": {
            "code": {"s3": {"bucket": "code", "prefix": key}},
            "runtime": managed,
            "entryPoint": ["main.py"],
        }},
        roleArn=ROLE,
        networkConfiguration={"networkMode": "PUBLIC"},
        requestHeaderConfiguration={"requestHeaderAllowlist": ["X-Tenant"]},
    )
    got = wait_status(control, created["agentRuntimeId"])
    assert got["status"] == "READY", got.get("failureReason")
    return created["agentRuntimeArn"], created["agentRuntimeId"]


def sid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4()}"


def invoke(data, arn, payload, session=None, **kw):
    if session:
        kw["runtimeSessionId"] = session
    return data.invoke_agent_runtime(
        agentRuntimeArn=arn, payload=json.dumps(payload), contentType="application/json", **kw
    )


def run_command(data, arn, session, command, timeout=None):
    body = {"command": command}
    if timeout is not None:
        body["timeout"] = timeout
    resp = data.invoke_agent_runtime_command(
        agentRuntimeArn=arn, runtimeSessionId=session, body=body
    )
    out = {"stdout": "", "stderr": "", "kinds": [], "stop": None}
    for event in resp["stream"]:
        (kind, value), = event["chunk"].items()
        out["kinds"].append(kind)
        if kind == "contentDelta":
            out["stdout"] += value.get("stdout", "")
            out["stderr"] += value.get("stderr", "")
        elif kind == "contentStop":
            out["stop"] = value
    out["session"] = resp["runtimeSessionId"]
    return out


def test_invoke_json_echoes_the_session(data, runtime):
    arn, _ = runtime
    session = sid("json")
    resp = invoke(data, arn, {"hello": "world"}, session,
                  runtimeUserId="user-1")
    assert resp["runtimeSessionId"] == session
    assert resp["contentType"] == "application/json"
    assert resp["statusCode"] == 200
    body = json.loads(resp["response"].read())
    assert body["echo"] == {"hello": "world"}
    assert body["session"] == session
    headers = {k.lower() for k in body["headers"]}
    assert "authorization" not in headers


def test_same_session_keeps_state_another_does_not(data, runtime):
    arn, _ = runtime
    a, b = sid("a"), sid("b")

    def count(session):
        return json.loads(invoke(data, arn, {"action": "count"}, session)["response"].read())["count"]

    assert [count(a), count(a), count(b), count(a)] == [1, 2, 1, 3]


def test_invoke_without_a_session_id_gets_one(data, runtime):
    arn, _ = runtime
    first = invoke(data, arn, {"action": "count"})
    second = invoke(data, arn, {"action": "count"})
    assert len(first["runtimeSessionId"]) >= 33
    assert first["runtimeSessionId"] != second["runtimeSessionId"]
    assert json.loads(second["response"].read())["count"] == 1


def test_streaming_arrives_before_the_agent_finishes(data, runtime):
    arn, _ = runtime
    session = sid("sse")
    release = "/mnt/workspace/release"
    resp = invoke(data, arn, {"action": "stream", "release": release}, session,
                  accept="text/event-stream")
    assert resp["contentType"].startswith("text/event-stream")
    chunks = resp["response"].iter_chunks(chunk_size=1)
    text = b""
    while b"\n\n" not in text:
        text += next(chunks)
    # The agent now waits for the release file, which only the command below creates.
    assert text == b'data: {"i": 0}\n\n'
    out = run_command(data, arn, session, f"touch {release}")
    assert out["stop"] == {"exitCode": 0, "status": "COMPLETED"}
    text += b"".join(chunks)
    assert text == b'data: {"i": 0}\n\ndata: {"i": 1}\n\n'


def test_agent_failure_is_runtime_client_error(data, runtime):
    arn, _ = runtime
    with pytest.raises(data.exceptions.RuntimeClientError) as e:
        invoke(data, arn, {"action": "fail"}, sid("fail"))
    assert "the agent failed on purpose" in e.value.response["Error"]["Message"]


def test_command_event_stream(data, runtime):
    arn, _ = runtime
    session = sid("cmd")
    out = run_command(data, arn, session, "echo out; echo err >&2; printf '\\342\\202\\254'; exit 3")
    assert out["session"] == session
    assert out["kinds"][0] == "contentStart" and out["kinds"][-1] == "contentStop"
    assert out["stdout"] == "out\n€"
    assert out["stderr"] == "err\n"
    assert out["stop"] == {"exitCode": 3, "status": "COMPLETED"}


def test_command_timeout(data, runtime):
    arn, _ = runtime
    out = run_command(data, arn, sid("timeout"), "sleep 30", timeout=1)
    assert out["stop"]["status"] == "TIMED_OUT"


def test_stop_then_resume_keeps_the_workspace(data, runtime):
    arn, _ = runtime
    session = sid("stop")

    def count():
        return json.loads(invoke(data, arn, {"action": "count"}, session)["response"].read())["count"]

    assert count() == 1
    assert run_command(data, arn, session, "echo kept > /mnt/workspace/note")["stop"]["exitCode"] == 0
    stopped = data.stop_runtime_session(agentRuntimeArn=arn, runtimeSessionId=session)
    assert stopped["runtimeSessionId"] == session
    # A new agent process (the counter restarts) over the same workspace.
    assert count() == 1
    assert run_command(data, arn, session, "cat /mnt/workspace/note")["stdout"] == "kept\n"


def test_unknown_runtime_and_session(data, runtime):
    arn, rid = runtime
    unknown = arn.replace(rid, "nope_agent-AbCdE12345")
    with pytest.raises(data.exceptions.ResourceNotFoundException):
        invoke(data, unknown, {}, sid("x"))
    with pytest.raises(data.exceptions.ResourceNotFoundException):
        invoke(data, arn.replace(f":{REGION}:", ":eu-west-3:"), {}, sid("x"))
    with pytest.raises(data.exceptions.ResourceNotFoundException):
        data.stop_runtime_session(agentRuntimeArn=arn, runtimeSessionId=sid("never-used"))
    with pytest.raises(data.exceptions.ResourceNotFoundException):
        invoke(data, arn, {}, sid("x"), qualifier="nope")


A2A_AGENT = """import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CARD = {"name": "berth-a2a", "description": "a test agent", "version": "1.0.0",
        "url": "http://127.0.0.1:9000/", "capabilities": {}, "skills": []}


class Handler(BaseHTTPRequestHandler):
    def send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/.well-known/agent-card.json":
            self.send(200, CARD)
        elif self.path == "/ping":
            self.send(200, {"status": "Healthy"})
        else:
            self.send(404, {"error": "no " + self.path})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send(200, {"path": self.path, "received": json.loads(body)})


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def test_get_agent_card_of_an_a2a_agent(berth, control, data):
    """A stdlib A2A server on port 9000: GetAgentCard proxies its card, and an invoke
    reaches `POST /` there."""
    python, managed = host_python()
    if python is None:
        pytest.skip("the host has no /usr/bin/python3.N for the sandbox")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("main.py", A2A_AGENT)
    key = f"agents/{uuid.uuid4()}.zip"
    berth.put_object("code", key, buf.getvalue())
    created = control.create_agent_runtime(
        agentRuntimeName="a2a_" + uuid.uuid4().hex[:12],
        agentRuntimeArtifact={"codeConfiguration": {
            "code": {"s3": {"bucket": "code", "prefix": key}},
            "runtime": managed,
            "entryPoint": ["main.py"],
        }},
        roleArn=ROLE,
        networkConfiguration={"networkMode": "PUBLIC"},
        protocolConfiguration={"serverProtocol": "A2A"},
    )
    got = wait_status(control, created["agentRuntimeId"])
    assert got["status"] == "READY", got.get("failureReason")
    arn, session = created["agentRuntimeArn"], sid("a2a")
    card = data.get_agent_card(agentRuntimeArn=arn, runtimeSessionId=session)
    assert card["agentCard"]["name"] == "berth-a2a"
    assert card["runtimeSessionId"] == session
    resp = invoke(data, arn, {"jsonrpc": "2.0"}, session)
    assert json.loads(resp["response"].read()) == {"path": "/", "received": {"jsonrpc": "2.0"}}
