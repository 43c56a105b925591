"""A small, real HTTP server speaking the few Kubernetes API calls the Kubernetes actuator makes
(read, list and patch pods; read and patch LeaderWorkerSets), for tests where no cluster can run.

It keeps objects in memory, applies merge patches the way the API server does for these fields
(maps merge, ``null`` deletes, other values replace; a custom resource takes only a JSON merge
patch, as on a real server), answers 404 with a ``Status`` for what it does not hold, and records
every request.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

POD = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?$")
MERGE, STRATEGIC = "application/merge-patch+json", "application/strategic-merge-patch+json"
LWS = re.compile(r"^/apis/leaderworkerset\.x-k8s\.io/v1/namespaces/([^/]+)/leaderworkersets/([^/]+)$")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class FakeKubernetesAPI:
    """``with FakeKubernetesAPI() as api:`` serves on a free loopback port (``api.url``)."""

    def __init__(self, namespace: str = "pdmesh") -> None:
        self.namespace = namespace
        self.pods: dict[str, dict] = {}
        self.lws: dict[str, dict] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content type)
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add_pod(self, name: str, labels: dict[str, str]) -> None:
        meta = {"name": name, "namespace": self.namespace, "labels": dict(labels)}
        self.pods[name] = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": []}}

    def add_lws(self, name: str, replicas: int, size: int) -> None:
        self.lws[name] = {
            "apiVersion": "leaderworkerset.x-k8s.io/v1",
            "kind": "LeaderWorkerSet",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"replicas": replicas, "leaderWorkerTemplate": {"size": size}},
        }

    def label(self, pod: str, key: str) -> str | None:
        with self.lock:
            return self.pods[pod]["metadata"].get("labels", {}).get(key)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig whose current context is this server and namespace."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "test"}}],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": self.namespace}}
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config))
        return path

    def start(self) -> FakeKubernetesAPI:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet: the test reads api.requests
                return None

            def do_GET(self) -> None:
                self._answer(*api.handle("GET", self.path, None, ""))

            def do_PATCH(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                self._answer(*api.handle("PATCH", self.path, body, self.headers.get("Content-Type", "")))

            def _answer(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-k8s", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FakeKubernetesAPI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def handle(self, method: str, raw_path: str, body: Any, content_type: str) -> tuple[int, dict]:
        url = urlsplit(raw_path)
        with self.lock:
            self.requests.append((method, url.path, content_type))
            if m := POD.match(url.path):
                if method == "PATCH" and content_type not in (MERGE, STRATEGIC):
                    return _status(415, "UnsupportedMediaType", f"{content_type} is not served here")
                return self._pods(method, m.group(1), m.group(2), parse_qs(url.query), body)
            if m := LWS.match(url.path):
                if method == "PATCH" and content_type != MERGE:  # custom resources take no strategic merge
                    return _status(415, "UnsupportedMediaType", f"{content_type} is not supported")
                return self._one(self.lws, "leaderworkersets", method, m.group(1), m.group(2), body)
        return _status(404, "NotFound", f"no route for {url.path}")

    def _pods(self, method: str, ns: str, name: str | None, query: dict, body: Any) -> tuple[int, dict]:
        if name is not None:
            return self._one(self.pods, "pods", method, ns, name, body)
        wanted = dict(p.split("=", 1) for p in query.get("labelSelector", [""])[0].split(",") if p)
        items = [
            pod
            for pod in self.pods.values()
            if pod["metadata"]["namespace"] == ns
            and all(pod["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
        ]
        return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

    def _one(self, store: dict, kind: str, method: str, ns: str, name: str, body: Any) -> tuple[int, dict]:
        obj = store.get(name)
        if obj is None or obj["metadata"]["namespace"] != ns:
            return _status(404, "NotFound", f'{kind} "{name}" not found')
        if method == "PATCH":
            store[name] = obj = merge_patch(obj, body)
        return 200, obj


def _status(code: int, reason: str, message: str) -> tuple[int, dict]:
    return code, {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "reason": reason,
        "message": message,
        "code": code,
    }
