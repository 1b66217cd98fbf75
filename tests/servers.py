"""Real servers on 127.0.0.1 for the remote-shard tests and benchmark: a plain HTTP file server
that counts requests and injects faults, and moto's S3 server."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


class FileServer(ThreadingHTTPServer):
    """Serves the files under ``root`` (HEAD, GET, single ``Range``), counting requests by
    (method, name). ``fail(name, *faults)`` queues faults for the next GETs of ``name``:
    ``"503"``, ``"drop"`` (full Content-Length, half the body, connection closed) or
    ``"short"`` (an honest but halved Content-Length) or ``"norange"`` (the whole file, as a
    server without range support answers); a fault ending in ``"+"`` repeats."""

    daemon_threads = True

    def __init__(self, root: str):
        self.root = root
        self.requests: Counter = Counter()
        self.faults: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fail(self, name: str, *faults: str) -> None:
        with self.lock:
            self.faults[name] = list(faults)

    def next_fault(self, name: str) -> str | None:
        with self.lock:
            queue = self.faults.get(name)
            if not queue:
                return None
            fault = queue[0]
            if not fault.endswith("+"):
                queue.pop(0)
            return fault.rstrip("+")

    def count(self, method: str, name: str) -> None:
        with self.lock:
            self.requests[(method, name)] += 1

    def total(self, method: str = "GET") -> int:
        with self.lock:
            return sum(n for (m, _), n in self.requests.items() if m == method)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.faults.clear()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FileServer

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        name = self.path.split("?", 1)[0].lstrip("/")
        self.server.count("HEAD" if head else "GET", name)
        fault = None if head else self.server.next_fault(name)
        path = os.path.join(self.server.root, name)
        if fault == "503":
            return self._reply(503, b"busy, try again", head)
        if not os.path.isfile(path):
            return self._reply(404, b"not found", head)
        with open(path, "rb") as f:
            data = f.read()
        status, body, extra = 200, data, {"Accept-Ranges": "bytes"}
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if m and fault != "norange":
            start = int(m.group(1))
            end = int(m.group(2)) + 1 if m.group(2) else len(data)
            body, status = data[start:end], 206
            extra["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        if fault == "short":
            body = body[: len(body) // 2]
        if fault == "drop":
            return self._drop(status, body, extra)
        self._reply(status, body, head, extra)

    def _reply(self, status: int, body: bytes, head: bool, extra: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _drop(self, status: int, body: bytes, extra: dict) -> None:
        """Promises the whole body, sends half of it, and cuts the connection."""
        self.send_response(status)
        for key, value in extra.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


class S3Server:
    """moto's S3 in server mode on 127.0.0.1; ``env()`` is what a client needs (set in
    ``os.environ`` so that forked workers and ranks inherit it)."""

    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def env(self) -> dict[str, str]:
        return {**S3_ENV, "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint}

    @contextlib.contextmanager
    def environment(self):
        """This server's endpoint and test credentials in ``os.environ`` (so that forked workers,
        ranks and Ray's workers see them), and no cached S3 client of another server's."""
        import s3fs

        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield self
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            s3fs.S3FileSystem.clear_instance_cache()

    def upload(self, local_dir: str, bucket: str, names: list[str]) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        for name in names:
            client.upload_file(os.path.join(local_dir, name), bucket, name)

    def stop(self) -> None:
        self.server.stop()
