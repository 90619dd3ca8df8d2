"""A Shared Signals transmitter for tests: its keys served by a loopback JWKS endpoint (and
an SSF configuration naming it), and the SETs it signs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from joserfc import jws
from joserfc.jwk import ECKey, RSAKey

RISC = "https://schemas.openid.net/secevent/risc/event-type/"
CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
AUDIENCE = "https://tokenwarden.test"
MEDIA_TYPE = "application/secevent+jwt"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.jwks: dict[str, Any] = {"keys": []}
        self.issuer = ""
        self.fetches = 0


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path == "/jwks":
            self.server.fetches += 1
            body = json.dumps(self.server.jwks).encode()
        elif self.path == "/.well-known/ssf-configuration":
            body = json.dumps(
                {
                    "issuer": self.server.issuer,
                    "jwks_uri": f"http://127.0.0.1:{self.server.server_address[1]}/jwks",
                    "delivery_methods_supported": ["urn:ietf:rfc:8935"],
                }
            ).encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Transmitter:
    """An identity provider pushing SETs; ``close`` stops its JWKS endpoint."""

    def __init__(self) -> None:
        self.server = _Server()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.issuer = f"{self.base}/idp"
        self.server.issuer = self.issuer
        self.key = RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "use": "sig"})
        self.ec_key = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
        self.publish(self.key, self.ec_key)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, *keys: RSAKey | ECKey) -> None:
        self.server.jwks = {"keys": [key.as_dict(private=False) for key in keys]}

    def config(self, *, via_configuration: bool = False) -> dict[str, str]:
        where = (
            {"configuration_url": f"{self.base}/.well-known/ssf-configuration"}
            if via_configuration
            else {"jwks_uri": f"{self.base}/jwks"}
        )
        return {"issuer": self.issuer, "audience": AUDIENCE, **where}

    def claims(self, event_type: str, event: dict[str, Any], **overrides: Any) -> dict[str, Any]:
        return {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "iat": int(time.time()),
            "jti": f"set-{uuid.uuid4().hex}",
            "events": {event_type: event},
        } | overrides

    def sign(
        self, claims: dict[str, Any], *, key: RSAKey | ECKey | None = None, **header: Any
    ) -> bytes:
        key = key or self.key
        alg = "ES256" if isinstance(key, ECKey) else "RS256"
        protected = {"alg": alg, "kid": key.kid, "typ": "secevent+jwt"} | header
        return jws.serialize_compact(protected, json.dumps(claims), key).encode()

    def unsigned(self, claims: dict[str, Any]) -> bytes:
        """``alg: none``: a header and payload, no signature."""
        header = {"alg": "none", "kid": self.key.kid, "typ": "secevent+jwt"}
        return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.".encode()

    def hs256_with_public_key(self, claims: dict[str, Any]) -> bytes:
        """The classic confusion: HMAC-SHA256 keyed with the transmitter's public key."""
        header = {"alg": "HS256", "kid": self.key.kid, "typ": "secevent+jwt"}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        secret = self.key.as_pem(private=False)
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(mac)}".encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def account_disabled(email: str) -> tuple[str, dict[str, Any]]:
    return RISC + "account-disabled", {"subject": {"format": "email", "email": email}}


def credential_compromise(token_id: str) -> tuple[str, dict[str, Any]]:
    return RISC + "credential-compromise", {
        "subject": {"format": "opaque", "id": token_id},
        "credential_type": "api-key",
    }


def credential_revoked(token_id: str) -> tuple[str, dict[str, Any]]:
    return CAEP + "credential-change", {
        "subject": {"format": "opaque", "id": token_id},
        "credential_type": "api-key",
        "change_type": "revoke",
    }
