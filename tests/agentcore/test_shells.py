"""Interactive shells and the agent WebSocket through the unmodified `bedrock-agentcore`
SDK: `open_shell` in its three auth modes (SigV4 headers, a presigned URL, the OAuth
subprotocol carrying a Berth token), reconnecting to a shell by id and seeing its
earlier output, a newer client kicking an older one (close 4000), the exit code; and
`generate_ws_connection` / `generate_presigned_url` / `generate_ws_connection_oauth` to
an agent whose `@app.websocket` echoes.

The SDK's shell client reads `BEDROCK_AGENTCORE_DP_ENDPOINT` when it is imported, only
accepts AWS host names and `wss://`, and trusts `SSL_CERT_FILE`: so the SDK runs in a
child process started with that environment, where `socket.getaddrinfo` resolves the
test host name (`conftest.AWS_HOST`, in the server's certificate) to 127.0.0.1.
"""

import json
import os
import subprocess
import sys
import uuid

import pytest

from conftest import AWS_HOST, DEADLINE, REGION, ROLE, agent_zip, host_python, wait_status

WS_AGENT = '''from bedrock_agentcore import BedrockAgentCoreApp

app = BedrockAgentCoreApp()


@app.entrypoint
def invoke(payload, context):
    return {"ok": True}


@app.websocket
async def ws(websocket, context):
    await websocket.accept()
    while True:
        msg = await websocket.receive()
        if msg["type"] == "websocket.disconnect":
            return
        if msg.get("text") is not None:
            await websocket.send_text(f"echo:{context.session_id}:{msg['text']}")
        else:
            await websocket.send_bytes(b"echo:" + msg["bytes"])


if __name__ == "__main__":
    app.run()
'''

# What every child process runs first: the host name resolved in-process, then the SDK.
PRELUDE = r'''
import asyncio, json, os, socket, sys

_HOST = os.environ["BERTH_TEST_HOST"]
_getaddrinfo = socket.getaddrinfo


def _resolve_test_host(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    return _getaddrinfo("127.0.0.1" if name == _HOST else host, *args, **kwargs)


socket.getaddrinfo = _resolve_test_host

import websockets
from bedrock_agentcore.runtime import AgentCoreRuntimeClient
from bedrock_agentcore.runtime.models import SESSION_HEADER, SHELL_ID_HEADER
from bedrock_agentcore.runtime.shell import OAuthAuth, PresignedAuth, ShellChannel

ARGS = json.loads(os.environ["BERTH_TEST_ARGS"])
DEADLINE = float(os.environ["BERTH_TEST_DEADLINE"])
client = AgentCoreRuntimeClient(region=os.environ["AWS_REGION"])


async def next_frame(sh):
    return await asyncio.wait_for(sh.__anext__(), DEADLINE)


async def read_until(sh, needle):
    """Standard output until `needle` shows."""
    text = ""
    while needle not in text:
        frame = await next_frame(sh)
        if frame.channel == ShellChannel.STDOUT:
            text += frame.text
    return text


async def drain(sh):
    """Frames until the session ends (exit, kick, close)."""
    try:
        while True:
            await next_frame(sh)
    except StopAsyncIteration:
        pass
'''


def sdk(berth, script: str, **args) -> dict:
    """Run `script` (after PRELUDE) in a child process with the SDK's environment; it
    prints one JSON object last."""
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith("AWS_")}
    env.update({
        "BEDROCK_AGENTCORE_DP_ENDPOINT": f"https://{AWS_HOST}:{berth.port}",
        "SSL_CERT_FILE": berth.ca,
        "AWS_ACCESS_KEY_ID": berth.access_key_id,
        "AWS_SECRET_ACCESS_KEY": berth.secret_access_key,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "BERTH_TEST_HOST": AWS_HOST,
        "BERTH_TEST_ARGS": json.dumps(args),
        "BERTH_TEST_DEADLINE": str(DEADLINE),
    })
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + script],
        env=env, capture_output=True, text=True, timeout=10 * DEADLINE,
    )
    assert out.returncode == 0, f"SDK process failed:\n{out.stderr[-6000:]}\n--- server ---\n{berth.log()}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runtime(berth, control):
    """A READY runtime whose agent echoes on its WebSocket: its ARN."""
    python, managed = host_python()
    if python is None:
        pytest.skip("the host has no /usr/bin/python3.N for the sandbox")
    key = f"agents/{uuid.uuid4()}.zip"
    berth.put_object("code", key, agent_zip(python, WS_AGENT))
    created = control.create_agent_runtime(
        agentRuntimeName="shells_" + uuid.uuid4().hex[:12],
        agentRuntimeArtifact={"codeConfiguration": {
            "code": {"s3": {"bucket": "code", "prefix": key}},
            "runtime": managed,
            "entryPoint": ["main.py"],
        }},
        roleArn=ROLE,
        networkConfiguration={"networkMode": "PUBLIC"},
    )
    got = wait_status(control, created["agentRuntimeId"])
    assert got["status"] == "READY", got.get("failureReason")
    return created["agentRuntimeArn"]


def sid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4()}"


OPEN_RECONNECT_KICK_EXIT = r'''
async def main():
    arn, sid, out = ARGS["arn"], ARGS["sid"], {}
    # SigV4 headers (the default; `Host` goes twice, B3).
    async with client.open_shell(arn, session_id=sid, shell_id="py-shell") as sh:
        out["ids"] = [sh.shell_id, sh.session_id]
        await sh.send("X=$((6*7)); echo py-$X\n")
        await read_until(sh, "py-42")
    # close() only closed the socket: the same ids reattach, and the output comes again.
    async with client.open_shell(arn, session_id=sid, shell_id="py-shell") as sh:
        await read_until(sh, "py-42")
        await sh.resize(120, 40)
        await sh.send("stty size; echo again-$X\n")
        out["again"] = await read_until(sh, "again-42")
        # Another client of the same shell: this one is kicked (4000), the PTY stays.
        url, headers = client.connect_shell(arn, session_id=sid, shell_id="py-shell")
        raw = await websockets.connect(url, additional_headers=headers)
        first = await asyncio.wait_for(raw.recv(), DEADLINE)
        out["raw_first"] = [first[0], json.loads(first[1:])]
        out["raw_headers"] = [raw.response.headers.get(SHELL_ID_HEADER),
                              raw.response.headers.get(SESSION_HEADER)]
        await drain(sh)
        out["kicked"] = sh.kicked
        await raw.close()
    async with client.open_shell(arn, session_id=sid, shell_id="py-shell") as sh:
        await sh.send("echo still-$X; exit 5\n")
        await read_until(sh, "still-42")
        await drain(sh)
        out["exit_code"] = sh.exit_code
    print(json.dumps(out))

asyncio.run(main())
'''


def test_open_shell_reconnect_kick_and_exit(berth, runtime):
    session = sid("shell")
    out = sdk(berth, OPEN_RECONNECT_KICK_EXIT, arn=runtime, sid=session)
    assert out["ids"] == ["py-shell", session]
    assert "40 120" in out["again"]
    assert out["raw_first"] == [3, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                                    "metadata": {"shellId": "py-shell", "reconnected": True}}]
    assert out["raw_headers"] == ["py-shell", session]
    assert out["kicked"] is True
    assert out["exit_code"] == 5


PRESIGNED_AND_OAUTH = r'''
async def main():
    arn, sid, out = ARGS["arn"], ARGS["sid"], {}
    # A presigned URL: the session id in the query, `host` signed without the port (S13).
    async with client.open_shell(arn, session_id=sid, shell_id="pre",
                                 auth=PresignedAuth(expires=60)) as sh:
        out["presigned_ids"] = [sh.shell_id, sh.session_id]
        await sh.send("echo pre-$((3*3))\n")
        await read_until(sh, "pre-9")
    # The OAuth mode with a Berth token, reconnecting to the same shell.
    async with client.open_shell(arn, session_id=sid, shell_id="pre",
                                 auth=OAuthAuth(bearer_token=ARGS["token"])) as sh:
        out["oauth_replay"] = "pre-9" in await read_until(sh, "pre-9")
        await sh.send("exit\n")
        await drain(sh)
        out["exit_code"] = sh.exit_code
    # A token Berth did not issue is refused before the upgrade.
    try:
        async with client.open_shell(arn, session_id=sid, shell_id="pre",
                                     auth=OAuthAuth(bearer_token="not-a-berth-token")):
            out["refused"] = None
    except websockets.exceptions.InvalidStatus as e:
        out["refused"] = e.response.status_code
    print(json.dumps(out))

asyncio.run(main())
'''


def test_presigned_and_oauth_shells(berth, runtime):
    session = sid("presigned")
    out = sdk(berth, PRESIGNED_AND_OAUTH, arn=runtime, sid=session, token=berth.token)
    assert out["presigned_ids"] == ["pre", session]
    assert out["oauth_replay"] is True
    assert out["exit_code"] == 0
    assert out["refused"] in (401, 403)


AGENT_WEBSOCKET = r'''
async def main():
    arn, sid, out = ARGS["arn"], ARGS["sid"], {}

    async def echo(url, headers=None):
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send("hi")
            text = await asyncio.wait_for(ws.recv(), DEADLINE)
            await ws.send(b"\x00\x01")
            data = await asyncio.wait_for(ws.recv(), DEADLINE)
            return [text, list(data)]

    url, headers = client.generate_ws_connection(arn, session_id=sid, endpoint_name="DEFAULT")
    out["sigv4"] = await echo(url, headers)
    out["presigned"] = await echo(client.generate_presigned_url(arn, session_id=sid, expires=60))
    url, headers = client.generate_ws_connection_oauth(arn, bearer_token=ARGS["token"],
                                                       session_id=sid)
    out["oauth"] = await echo(url, headers)
    print(json.dumps(out))

asyncio.run(main())
'''


def test_agent_websocket(berth, runtime):
    session = sid("ws")
    out = sdk(berth, AGENT_WEBSOCKET, arn=runtime, sid=session, token=berth.token)
    want = [f"echo:{session}:hi", list(b"echo:\x00\x01")]
    assert out == {"sigv4": want, "presigned": want, "oauth": want}
