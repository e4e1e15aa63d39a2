"""A runtime from a container image through unmodified boto3, over HTTPS with SigV4: an
image holding a working `BedrockAgentCoreApp` agent is built here and pushed to a local
registry (Debian's `docker-registry`, started on a loopback port) with plain HTTP calls
to its v2 API, CreateAgentRuntime names it in `containerConfiguration`, and
InvokeAgentRuntime runs its entry point in its working directory with its environment,
one agent process per session.

The image is one uncompressed tar layer: the host's python (`/usr/bin/python3.N`) with
its standard library and the shared libraries it and its extension modules load,
bedrock-agentcore vendored under `/opt/agent-deps` (the same `target/tmp/` copy as the
code-zip tests), the agent at `/app/main.py`, and the libraries Berth's in-sandbox guest
agent (the berth binary, run inside the image's root) loads.
"""

import hashlib
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import BERTH, DEADLINE, ROLE, wait_status
from conftest import host_python, vendored
from test_data_plane import sid

REGISTRY_BIN = "/usr/bin/docker-registry"
REPO = "agents/py"
DEPS = "/opt/agent-deps"
AGENT = '''import os
import sys

from bedrock_agentcore import BedrockAgentCoreApp

app = BedrockAgentCoreApp()
COUNT = 0


@app.entrypoint
def invoke(payload, context):
    global COUNT
    COUNT += 1
    return {"echo": payload, "session": context.session_id, "count": COUNT,
            "cwd": os.getcwd(), "docker": os.environ.get("DOCKER_CONTAINER"),
            "argv": [sys.executable] + sys.argv}


if __name__ == "__main__":
    app.run()
'''
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3"}

# Plain HTTP to the loopback registry, whatever proxy the environment names.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry():
    """A `docker-registry serve` on a free loopback port: its `host:port`."""
    if not os.path.isfile(REGISTRY_BIN):
        pytest.skip(f"{REGISTRY_BIN} is missing (apt-get install docker-registry)")
    root = Path(tempfile.mkdtemp(prefix="berth-registry-"))
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'store'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = open(root / "registry.log", "ab")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                with HTTP.open(f"http://127.0.0.1:{port}/v2/", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (root / "registry.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "docker-registry did not start"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


# ---- the image ----

def ldd(binary: str) -> list:
    """The shared libraries `binary` loads, the loader included."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        right = line.split("=>", 1)[1] if "=>" in line else line
        words = right.split()
        if words and words[0].startswith("/"):
            libs.append(words[0])
    return libs


class Layer:
    """An uncompressed tar of host files at image paths (symlinks stored as the files
    they name, modes and mtimes kept: python checks its `.pyc`s against them)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.GNU_FORMAT,
                                dereference=True)
        self.names = set()

    def file(self, host: str, image: str):
        name = image.lstrip("/")
        if name not in self.names:
            self.names.add(name)
            self.tar.add(host, arcname=name, recursive=False)

    def tree(self, host: str, image: str, skip=lambda name: False):
        self.tar.add(host, arcname=image.lstrip("/"), recursive=False)
        for name in sorted(os.listdir(host)):
            path = os.path.join(host, name)
            if skip(name) or not os.path.exists(path):
                continue
            if os.path.isdir(path):
                self.tree(path, f"{image}/{name}")
            elif os.path.isfile(path):
                self.file(path, f"{image}/{name}")

    def data(self, name: str, text: str):
        info = tarfile.TarInfo(name.lstrip("/"))
        info.mode, info.mtime = 0o644, int(time.time())
        raw = text.encode()
        info.size = len(raw)
        self.tar.addfile(info, io.BytesIO(raw))

    def dir(self, name: str):
        info = tarfile.TarInfo(name.lstrip("/"))
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
        self.tar.addfile(info)

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def shared_objects(root: str):
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".so"):
                yield os.path.join(dirpath, f)


def agent_layer(python: Path, deps: Path) -> bytes:
    stdlib = f"/usr/lib/{python.name}"
    layer = Layer()
    layer.file(str(python), str(python))
    layer.tree(stdlib, stdlib, lambda n: n in STDLIB_SKIP or n.startswith("config-"))
    layer.tree(str(deps), DEPS, lambda n: n == ".complete")
    layer.dir("/app")
    layer.data("/app/main.py", AGENT)
    binaries = [str(python), BERTH, *shared_objects(f"{stdlib}/lib-dynload"),
                *shared_objects(str(deps))]
    for lib in sorted({lib for b in binaries for lib in ldd(b)}):
        layer.file(lib, lib)
    return layer.bytes()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def upload_blob(registry: str, data: bytes) -> dict:
    """A monolithic blob upload: POST …/blobs/uploads/, then PUT <location>?digest=…"""
    base = f"http://{registry}"
    req = urllib.request.Request(f"{base}/v2/{REPO}/blobs/uploads/", data=b"", method="POST")
    with HTTP.open(req) as r:
        assert r.status == 202, r.status
        location = urllib.parse.urljoin(base, r.headers["Location"])
    d = digest(data)
    sep = "&" if "?" in location else "?"
    req = urllib.request.Request(
        f"{location}{sep}digest={urllib.parse.quote(d)}", data=data, method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with HTTP.open(req) as r:
        assert r.status == 201, r.status
    return {"digest": d, "size": len(data)}


def push_agent_image(registry: str, tag: str) -> str:
    python, _ = host_python()
    if python is None:
        pytest.skip("the host has no /usr/bin/python3.N to put in the image")
    layer = agent_layer(python, vendored(python))
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    config = json.dumps({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": [str(python), "main.py"],
            "WorkingDir": "/app",
            "Env": [f"PYTHONPATH={DEPS}", "DOCKER_CONTAINER=1"],
        },
        "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **upload_blob(registry, config)},
        "layers": [{"mediaType": OCI_LAYER_TAR, **upload_blob(registry, layer)}],
    }).encode()
    req = urllib.request.Request(
        f"http://{registry}/v2/{REPO}/manifests/{tag}", data=manifest, method="PUT",
        headers={"Content-Type": OCI_MANIFEST},
    )
    with HTTP.open(req) as r:
        assert r.status == 201, r.status
    return f"{registry}/{REPO}:{tag}"


# ---- the test ----

def test_invoke_an_agent_from_a_container_image(control, data, registry):
    uri = push_agent_image(registry, "v1")
    created = control.create_agent_runtime(
        agentRuntimeName="img_" + uuid.uuid4().hex[:12],
        agentRuntimeArtifact={"containerConfiguration": {"containerUri": uri}},
        roleArn=ROLE,
        networkConfiguration={"networkMode": "PUBLIC"},
    )
    runtime_id, arn = created["agentRuntimeId"], created["agentRuntimeArn"]
    got = wait_status(control, runtime_id)
    assert got["status"] == "READY", got.get("failureReason")
    assert got["agentRuntimeArtifact"]["containerConfiguration"]["containerUri"] == uri

    def invoke(session, payload):
        resp = data.invoke_agent_runtime(
            agentRuntimeArn=arn, runtimeSessionId=session,
            payload=json.dumps(payload), contentType="application/json",
        )
        assert resp["statusCode"] == 200
        assert resp["runtimeSessionId"] == session
        assert resp["contentType"] == "application/json"
        return json.loads(resp["response"].read())

    a, b = sid("img-a"), sid("img-b")
    first = invoke(a, {"prompt": "hello", "n": [1, 2]})
    python, _ = host_python()
    assert first == {
        "echo": {"prompt": "hello", "n": [1, 2]},
        "session": a,
        "count": 1,
        "cwd": "/app",
        "docker": "1",
        "argv": [str(python), "main.py"],
    }
    # The same session keeps its agent (and its state); another session has its own.
    assert invoke(a, {})["count"] == 2
    assert invoke(b, {})["count"] == 1
    assert invoke(a, {})["count"] == 3

    control.delete_agent_runtime(agentRuntimeId=runtime_id)
