"""The outside world of ``tokenwarden demo``: GitHub's key endpoint and a webhook receiver.

Both run on loopback in the demo's own process. The receiver checks every notice's Standard
Webhooks signature before it counts it.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

KEY_ID = "demo-github-key"


@dataclass
class Peers:
    """A P-256 key pair standing in for GitHub's, and a receiver of signed notices."""

    secret: str = field(
        default_factory=lambda: "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    )
    private_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    notices: list[dict[str, Any]] = field(default_factory=list)
    rejected: int = 0
    server: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def keys_document(self) -> bytes:
        pem = (
            self.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        return json.dumps(
            {"public_keys": [{"key_identifier": KEY_ID, "key": pem, "is_current": True}]}
        ).encode()

    def sign(self, body: bytes) -> str:
        signature = self.private_key.sign(body, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(signature).decode()

    def receive(self, body: bytes, headers: dict[str, str]) -> bool:
        try:
            notice = Webhook(self.secret).verify(body, headers)
        except WebhookVerificationError:
            self.rejected += 1
            return False
        self.notices.append({"webhook_id": headers.get("webhook-id"), **notice})
        return True

    def start(self) -> None:
        peers = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = peers.keys_document()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ok = peers.receive(body, {k.lower(): v for k, v in self.headers.items()})
                self.send_response(204 if ok else 400)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                del format, args  # the demo narrates; no access log

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
