"""Object-store faults for tests, as real processes: a moto S3 server that can be stopped and
started again with its objects intact, and an HTTP proxy in front of one that answers
``503 SlowDown`` and delays responses for a window of time.

moto keeps objects in memory, so a restarted server would come back empty. An S3 outage
does not lose data, and a reader that met an empty bucket would read a missing chunk as
zarr's fill value. So ``MotoServer`` loads a local directory into its bucket *before* it
listens on its port: a staging server on a free port takes the uploads (through the S3 API),
then a second server sharing the same in-process backend opens the public port.

Run as a script, this file is the server process (``moto``) or the proxy (``proxy``);
``MotoServer`` and ``FaultProxy`` start and stop those processes from a test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message>"
             b"<RequestId>fault-proxy</RequestId></Error>")


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {process.returncode}")
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            return
        except urllib.error.HTTPError:  # the proxy forwards moto's answer; any answer is up
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no server came up on {url} within {timeout:.0f} s")


class MotoServer:
    """A moto server process on a fixed port whose bucket holds ``source`` (a local
    directory) under ``s3://bucket/key`` from the moment it listens, after every start."""

    def __init__(self, source: str | Path, bucket: str, key: str, port: int | None = None
                 ) -> None:
        from helpers.ports import free_port  # not at the top: run as a script, this file has
        # tests/helpers on its path, not tests

        self.source, self.bucket, self.key = str(source), bucket, key
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "moto", "--port", str(self.port), "--load",
             self.source, "--bucket", self.bucket, "--key", self.key],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_up(self.url, self.process)

    def stop(self) -> None:
        """Kills the server at once (connections are refused from here on)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None


class FaultProxy:
    """The proxy process: forwards every request to ``upstream``; inside a window set by
    :meth:`inject` it answers ``503 SlowDown`` to every ``error_every``-th request and
    delays every response by ``delay_s``. Each fault it injects is one line of its log, and
    each request it forwards one line of its request log (``requests``)."""

    def __init__(self, upstream: str, folder: Path) -> None:
        from helpers.ports import free_port  # (see MotoServer)

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.control, self.log = folder / "faults.json", folder / "faults.log"
        self.request_log = folder / "requests.log"
        self.control.write_text("{}")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "proxy", "--port", str(self.port), "--upstream",
             upstream, "--control", str(self.control), "--log", str(self.log),
             "--requests", str(self.request_log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_up(self.url, self.process)

    def inject(self, seconds: float, *, error_every: int = 1, delay_s: float = 0.0) -> None:
        """Faults from now for ``seconds``."""
        spec = {"until": time.time() + seconds, "error_every": error_every, "delay_s": delay_s}
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec))
        os.replace(tmp, self.control)

    def injected(self) -> dict[str, int]:
        """How many faults were injected so far, by kind (``error``, ``delay``)."""
        lines = self.log.read_text().split() if self.log.exists() else []
        return {kind: lines.count(kind) for kind in ("error", "delay")}

    def requests(self) -> list[tuple[str, str, int]]:
        """The requests forwarded so far, in order: ``(method, path without the query,
        bytes of the body)``: a PUT's or POST's own body, else the answer's."""
        lines = self.request_log.read_text().splitlines() if self.request_log.exists() else []
        return [(method, path, int(size)) for method, path, size in map(str.split, lines)]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


# -- the processes --------------------------------------------------------------------------
def serve_moto(port: int, source: str, bucket: str, key: str) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    staging = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    staging.start()
    host, staging_port = staging.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{staging_port}",
                          region_name="us-east-1", aws_access_key_id="k",
                          aws_secret_access_key="s")
    client.create_bucket(Bucket=bucket)
    root = Path(source)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{key}/{path.relative_to(root).as_posix()}",
                          Body=path.read_bytes())
    staging.stop()
    public = ThreadedMotoServer("127.0.0.1", port, verbose=False)  # same backend, now loaded
    public.start()
    threading.Event().wait()


def serve_proxy(port: int, upstream: str, control: str, log: str, requests: str) -> None:
    target = upstream.removeprefix("http://")
    counter = iter(range(1 << 62))
    log_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _fault(self) -> tuple[bool, float]:
            try:
                spec = json.loads(Path(control).read_text() or "{}")
            except (OSError, ValueError):
                spec = {}
            if time.time() >= spec.get("until", 0):
                return False, 0.0
            every = int(spec.get("error_every", 1))
            return every > 0 and next(counter) % every == 0, float(spec.get("delay_s", 0))

        def _note(self, kind: str, file: str = log) -> None:
            with log_lock, open(file, "a") as out:
                out.write(kind + "\n")

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            error, delay = self._fault()
            if delay:
                self._note("delay")
                time.sleep(delay)
            if error:
                self._note("error")
                self._reply(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
                return
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("connection", "keep-alive", "proxy-connection")}
            upstream_conn = http.client.HTTPConnection(target, timeout=60)
            try:
                upstream_conn.request(self.command, self.path, body=body, headers=headers)
                response = upstream_conn.getresponse()
                data = response.read()
                sent = len(body or b"") if self.command in ("PUT", "POST") else len(data)
                self._note(f"{self.command} {self.path.split('?', 1)[0]} {sent}", requests)
                dropped = ("connection", "keep-alive", "transfer-encoding",
                           *(() if self.command == "HEAD" else ("content-length",)))
                kept = {k: v for k, v in response.getheaders() if k.lower() not in dropped}
                self._reply(response.status, kept, data)
            finally:
                upstream_conn.close()

        def _reply(self, status: int, headers: dict[str, str], data: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if self.command != "HEAD" or "content-length" not in map(str.lower, headers):
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    moto = sub.add_parser("moto")
    for name in ("--port", "--load", "--bucket", "--key"):
        moto.add_argument(name, required=True, type=int if name == "--port" else str)
    proxy = sub.add_parser("proxy")
    for name in ("--port", "--upstream", "--control", "--log", "--requests"):
        proxy.add_argument(name, required=True, type=int if name == "--port" else str)
    args = parser.parse_args()
    if args.what == "moto":
        serve_moto(args.port, args.load, args.bucket, args.key)
    else:
        serve_proxy(args.port, args.upstream, args.control, args.log, args.requests)


if __name__ == "__main__":
    main()
