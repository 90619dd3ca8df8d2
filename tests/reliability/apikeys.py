"""The credentials a caller of the producer API holds: producer key, GitLab secret, GitHub key.

GitHub signs each secret-scanning request with an ECDSA P-256 key whose public half it
publishes; :class:`GitHubSigner` plays GitHub, with a key pair of its own served on
127.0.0.1 in GitHub's format, so the API under test can fetch it like the real one.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.stack import KEY
from tokenwarden.worker.ops.supervisor import free_port

PRODUCER_KEY: Final = KEY
GITLAB_SECRET: Final = "glrt-chaos-revocation-secret"
ADMIN_KEY: Final = "twa_chaos_admin_key_00001"
IDENTIFIER_HEADER: Final = "Github-Public-Key-Identifier"
SIGNATURE_HEADER: Final = "Github-Public-Key-Signature"
GITHUB_PATH: Final = "/v1/secret-scanning/github"


class GitHubSigner:
    """A key pair, its public half served as GitHub serves its keys, and signatures."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.identifier = (
            "chaos-"
            + base64.b16encode(
                self.key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )[-8:]
            )
            .decode()
            .lower()
        )
        self.stranger = ec.generate_private_key(ec.SECP256R1())
        pem = (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        document = json.dumps(
            {"public_keys": [{"key_identifier": self.identifier, "key": pem, "is_current": True}]}
        ).encode()
        self.fetches = 0
        signer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                signer.fetches += 1
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(document)))
                self.end_headers()
                self.wfile.write(document)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def keys_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/meta/public_keys/secret_scanning"

    def sign(self, body: bytes, *, stranger: bool = False) -> str:
        key = self.stranger if stranger else self.key
        return base64.b64encode(key.sign(body, ec.ECDSA(hashes.SHA256()))).decode()

    def headers(self, body: bytes) -> dict[str, str]:
        return {IDENTIFIER_HEADER: self.identifier, SIGNATURE_HEADER: self.sign(body)}

    def __enter__(self) -> GitHubSigner:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def credentials(path: str, body: bytes, signer: GitHubSigner) -> dict[str, str]:
    """The headers that authenticate a request to ``path`` (none for public endpoints)."""
    if path == "/v1/events":
        return {"Authorization": f"Bearer {PRODUCER_KEY}"}
    if path == GITHUB_PATH:
        return signer.headers(body)
    if path in ("/v1/revoke_tokens", "/v1/revocable_token_types"):
        return {"Authorization": f"Bearer {GITLAB_SECRET}"}
    if path.startswith("/v1/tokens"):
        return {"Authorization": f"Bearer {ADMIN_KEY}"}
    return {}


AUTH_HEADERS: Final = ("authorization", IDENTIFIER_HEADER.lower(), SIGNATURE_HEADER.lower())
