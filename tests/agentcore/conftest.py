"""Harness for the AgentCore compatibility suite.

Every test module gets a real `berth server` on a fresh data dir and a free loopback
port, reached over HTTPS (the CA the server generates in `<data-dir>/tls/ca.pem`) with
SigV4 access keys minted by `berth access-key create` — exactly what a user of boto3 or
the `bedrock-agentcore` SDK does. Nothing is mocked.

`BERTH_BIN` names the berth binary (default: the workspace's `target/debug/berth`).
"""

import io
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

REPO = Path(__file__).resolve().parents[2]
BERTH = os.environ.get("BERTH_BIN", str(REPO / "target" / "debug" / "berth"))
REGION = "us-east-1"
ACCOUNT = "123456789012"
# The SDK's shell client only accepts AWS host names; tests resolve this one to
# 127.0.0.1 in-process (see `aws_hostname`).
AWS_HOST = f"berth-test.{REGION}.amazonaws.com"
# CreateAgentRuntime requires a role; Berth echoes it and assumes nothing.
ROLE = f"arn:aws:iam::{ACCOUNT}:role/berth-test"
DEADLINE = 120.0
# What agents in the sandbox import (vendored into their code zips).
PACKAGE = "bedrock-agentcore==1.25.0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Berth:
    """A running `berth server` and what a client needs to reach it."""

    def __init__(self, root: Path, extra_args=()):
        self.root = root
        self.extra_args = list(extra_args)
        self.data_dir = root / "data"
        self.log_path = root / "server.log"
        self.port = free_port()
        self.http_url = f"http://127.0.0.1:{self.port}"
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc = None
        self.start()
        self.token = (self.data_dir / "admin.token").read_text().strip()
        self.ca = str(self.data_dir / "tls" / "ca.pem")
        self.access_key_id, self.secret_access_key = self.create_access_key("pytest")

    def start(self):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                BERTH, "server",
                "--data-dir", str(self.data_dir),
                "--listen", f"127.0.0.1:{self.port}",
                "--region", REGION,
                "--account-id", ACCOUNT,
                "--tls-san", AWS_HOST,
                *self.extra_args,
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env={**os.environ, "RUST_LOG": "info"},
        )
        deadline = time.monotonic() + DEADLINE
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"berth server exited early:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                if (self.data_dir / "admin.token").exists() and (self.data_dir / "tls" / "ca.pem").exists():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"berth server did not come up:\n{self.log()}")
            time.sleep(0.05)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [BERTH, *args],
            env={**os.environ, "BERTH_URL": self.http_url, "BERTH_TOKEN": self.token},
            capture_output=True, text=True, timeout=DEADLINE,
        )
        if out.returncode != 0:
            raise RuntimeError(f"berth {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def create_access_key(self, name: str):
        out = self.cli("access-key", "create", "--name", name)
        akid = re.search(r"AWS_ACCESS_KEY_ID=(\S+)", out)
        secret = re.search(r"AWS_SECRET_ACCESS_KEY=(\S+)", out)
        assert akid and secret, f"unexpected `berth access-key create` output: {out}"
        return akid.group(1), secret.group(1)

    def client(self, service: str, *, key=None, secret=None, retries=1):
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=key or self.access_key_id,
            aws_secret_access_key=secret or self.secret_access_key,
            verify=self.ca,
            config=Config(retries={"max_attempts": retries, "mode": "standard"}),
        )

    def put_object(self, bucket: str, key: str, data: bytes):
        """The embedded object store: one directory per bucket under the data dir."""
        path = self.data_dir / "buckets" / bucket / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def start_berth(extra_args=()):
    """A server in a fresh temp dir (a generator: yields it, then stops and removes it)."""
    if os.geteuid() != 0:
        pytest.skip("the Berth server needs root (namespaces, cgroups, loop devices)")
    if not os.path.exists(BERTH):
        pytest.fail(f"no berth binary at {BERTH}; build it (cargo build -p berth) or set BERTH_BIN")
    root = Path(tempfile.mkdtemp(prefix="berth-pytest-"))
    # mkdtemp makes it 0700, which the sandboxes' mapped users cannot traverse to reach
    # their root filesystems under the data dir: every session would fail to start.
    root.chmod(0o755)
    server = Berth(root, extra_args)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def berth():
    yield from start_berth()


@pytest.fixture(scope="module")
def control(berth):
    return berth.client("bedrock-agentcore-control")


@pytest.fixture(scope="module")
def data(berth):
    return berth.client("bedrock-agentcore")


def zip_of(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()


def wait_status(control, runtime_id: str, version=None, want=("READY", "CREATE_FAILED", "UPDATE_FAILED")):
    """Poll GetAgentRuntime until it leaves CREATING/UPDATING, as the SDK's helpers do."""
    deadline = time.monotonic() + DEADLINE
    while True:
        kw = {"agentRuntimeId": runtime_id}
        if version:
            kw["agentRuntimeVersion"] = version
        got = control.get_agent_runtime(**kw)
        if got["status"] in want:
            return got
        assert time.monotonic() < deadline, f"runtime {runtime_id} stuck in {got['status']}"
        time.sleep(0.2)


def host_python():
    """A `/usr/bin/python3.N` of the host (what sandboxes run) and its managed runtime."""
    for n in range(10, 15):
        path = Path(f"/usr/bin/python3.{n}")
        if path.is_file():
            return path, f"PYTHON_3_{n}"
    return None, None


def vendored(python: Path) -> Path:
    """bedrock-agentcore installed for the sandbox's python into a directory of its own."""
    tmp = REPO / "target" / "tmp"
    target = tmp / f"agentcore-vendor-{python.name}-1.25.0"
    if (target / ".complete").is_file():
        return target
    staging = tmp / f"agentcore-vendor-{python.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    out = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-warn-script-location", "--target", str(staging), PACKAGE],
        capture_output=True, text=True, env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"},
    )
    if out.returncode != 0:
        pytest.skip(f"cannot vendor {PACKAGE}: {out.stderr[-2000:]}")
    (staging / ".complete").write_bytes(b"")
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def agent_zip(python: Path, main_py: str) -> bytes:
    """A code zip: the vendored packages (stored, not deflated: fast) and `main.py`."""
    vendor = vendored(python)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for root, dirs, files in os.walk(vendor):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for f in sorted(files):
                if f != ".complete":
                    p = os.path.join(root, f)
                    z.write(p, os.path.relpath(p, vendor))
        z.writestr("main.py", main_py)
    return buf.getvalue()
