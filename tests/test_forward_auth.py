"""GET /v1/auth as a gateway sees it: the token found in the original request in all five
forms, an identity to copy upstream or a bare 401, trusted callers only; and a real nginx,
configured with the README's file, in front of a tiny service."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from sqlalchemy.exc import OperationalError
from starlette.datastructures import Headers

from tests.conftest import REPO, Store
from tests.stack import LiveStack, event, stack_env
from tests.test_introspection import PRODUCER, Door, eventually
from tests.test_secrecy import assert_absent, captured_logs
from tokenwarden.config.settings import ConfigError, load_settings
from tokenwarden.producer.forward_auth import credential, own_uri
from tokenwarden.worker.domain import introspection
from tokenwarden.worker.domain.models import TokenKind
from tokenwarden.worker.domain.tokens import generate
from tokenwarden.worker.domain.verification import find_token
from tokenwarden.worker.ops.supervisor import free_port

__all__ = ["captured_logs"]  # a fixture, used by name

KEY = "twi_forward_auth_test_key_01"
GATEWAY = {"X-Tokenwarden-Key": KEY}
PEERS = "10.0.0.0/8"
NGINX_CONF = REPO / "docs" / "nginx-forward-auth.conf"
NGINX_FLAG = "TOKENWARDEN_TEST_NGINX"
# A token-shaped text the store does not know.
UNKNOWN = generate(TokenKind.PERSONAL)


def forms(token: str) -> list[tuple[dict[str, str], str]]:
    """(headers, original URI) of the original request, in each of the five forms."""
    return [
        ({"x-auth-token": token}, "/v1/items"),
        ({}, f"/v1/items?page=2&token={token}"),
        ({}, f"/{token}/api/v0/add?pin=true"),
        ({}, f"/ext/bc/C/rpc/{token}"),
        ({}, f"/{token}"),
    ]


FORM_NAMES = ["header", "query", "ipfs", "avalanche", "last-segment"]


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("TOKENWARDEN_")]:
        if not name.startswith("TOKENWARDEN_TEST_"):
            monkeypatch.delenv(name)


class Gate(Door):
    """The API with both ways to trust a gateway configured, on the test store."""

    def __init__(self, store: Store, home: Path, peer: str = "testclient") -> None:
        super().__init__(
            store, home, peer=peer, introspection_keys=(KEY,), forward_auth_peers=PEERS
        )

    def auth(self, headers: dict[str, str], uri: str, *, via: str = "x-original-uri") -> Any:
        return self.client.get("/v1/auth", headers=GATEWAY | headers | {via: uri})


@pytest.fixture
def gate(store: Store, tmp_path: Path) -> Iterator[Gate]:
    opened = Gate(store, tmp_path / "home")
    yield opened
    opened.close()
    store.truncate()


def identity(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-token-")}


# --- finding the credential -------------------------------------------------------------


@pytest.mark.parametrize("index", range(5), ids=FORM_NAMES)
@pytest.mark.parametrize("via", ["x-original-uri", "x-forwarded-uri", "own path"])
def test_the_token_is_found_in_each_form_from_each_source(index: int, via: str) -> None:
    token = generate(TokenKind.APPLICATION)
    headers, uri = forms(token)[index]
    if via == "own path":  # Envoy: path_prefix /v1/auth, then the original path
        path, _, query = f"/v1/auth{uri}".partition("?")
        scope = {"path": path, "raw_path": path.encode(), "query_string": query.encode()}
        found = credential(Headers(headers), own_uri(scope))
    else:
        found = credential(Headers(headers | {via: uri}), "/")
    assert found == token


def test_the_header_wins_and_two_sources_that_disagree_find_nothing() -> None:
    header, other = generate(TokenKind.PERSONAL), generate(TokenKind.PERSONAL)
    both = {"x-auth-token": header, "x-original-uri": f"/{other}"}
    assert credential(Headers(both), "/") == header
    disagree = {"x-original-uri": f"/{header}", "x-forwarded-uri": f"/{other}"}
    assert credential(Headers(disagree), "/") is None
    agree = {"x-original-uri": f"/{header}", "x-forwarded-uri": f"/{header}"}
    assert credential(Headers(agree), "/") == header


@pytest.mark.parametrize(
    "uri",
    [
        *("", "/", "*", "no-slash", "ftp://svc.example/x", "http://", "/" + "a" * (16 * 1024)),
        *("http://[abc/x", "https://[::1/sm_pat_x"),  # hosts urlsplit cannot read
    ],
)
def test_weird_or_oversized_uris_carry_no_token(uri: str) -> None:
    assert credential(Headers({"x-original-uri": uri}), "/") is None


def test_an_absolute_original_uri_is_read_too() -> None:
    token = generate(TokenKind.PERSONAL)
    found = credential(Headers({"x-forwarded-uri": f"https://svc.example/{token}"}), "/")
    assert found == token


# --- answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["x-original-uri", "x-forwarded-uri"])
def test_an_active_pat_passes_with_its_identity_in_every_form(gate: Gate, via: str) -> None:
    gate.member("bob", "admin")
    pat = gate.pat("bob")
    for headers, uri in forms(pat.token):
        answer = gate.auth(headers, uri, via=via)
        assert answer.status_code == 200, (uri, answer.text)
        assert identity(answer) == {
            "x-token-id": pat.id,
            "x-token-kind": "personal",
            "x-token-org": "acme",
            "x-token-user": "bob",
            "x-token-app": "",
            "x-token-role": "admin",
        }
        assert answer.content == b""
        assert answer.headers["cache-control"] == "no-store"


def test_an_aat_passes_as_its_application(gate: Gate) -> None:
    gate.member("bob")
    aat = gate.aat("ci", "bob")
    answer = gate.auth({"x-auth-token": aat.token}, "/")
    assert answer.status_code == 200
    assert identity(answer) == {
        "x-token-id": aat.id,
        "x-token-kind": "application",
        "x-token-org": "acme",
        "x-token-user": "",
        "x-token-app": "ci",
        "x-token-role": "",
    }


def test_envoy_asks_with_the_original_path_after_the_prefix(gate: Gate) -> None:
    gate.member("bob")
    pat = gate.pat("bob")
    for headers, uri in forms(pat.token):
        answer = gate.client.request("POST", f"/v1/auth{uri}", headers=GATEWAY | headers)
        assert answer.status_code == 200, uri
        assert answer.headers["x-token-id"] == pat.id
    assert gate.client.get("/v1/auth/", headers=GATEWAY).status_code == 401


def test_every_refusal_is_a_bare_401(gate: Gate) -> None:
    gate.member("bob")
    gate.member("carol")
    revoked, leaver = gate.pat("bob"), gate.pat("carol")
    gate.revoke(revoked.id)
    gate.remove("carol")
    texts = [UNKNOWN, revoked.token, leaver.token, revoked.token[:-1] + "x", "sm_pat_abc", "x"]
    for text in texts:
        for headers, uri in forms(text):
            answer = gate.auth(headers, uri)
            assert answer.status_code == 401, uri
            assert answer.content == b""
            assert identity(answer) == {}
    assert gate.auth({}, "/").status_code == 401
    # An original URI whose host cannot be read is no credential, not a server error.
    assert gate.auth({}, "http://[abc/x").status_code == 401


def test_a_malformed_token_costs_no_look_up(gate: Gate, monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[str] = []

    def noting(session: Any, text: str) -> Any:
        looked_up.append(text)
        return find_token(session, text)

    monkeypatch.setattr(introspection, "find_token", noting)
    for text in ("sm_pat_short", "sm_pat_" + "a" * 38, "favicon.ico"):
        assert gate.auth({}, f"/{text}").status_code == 401
    assert looked_up == []
    assert gate.auth({}, f"/{UNKNOWN}").status_code == 401
    assert looked_up == [UNKNOWN]  # the same path reads the store for a well-formed one


def test_a_store_that_cannot_be_read_is_no_answer(
    gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(session: Any, text: str) -> Any:
        raise OperationalError("SELECT", {}, Exception(f"server closed the connection {text}"))

    monkeypatch.setattr(introspection, "find_token", down)
    with structlog.testing.capture_logs() as logs:
        answer = gate.auth({"x-auth-token": UNKNOWN}, "/")
    assert (answer.status_code, answer.headers["retry-after"]) == (503, "5")
    assert identity(answer) == {}
    assert "forward_auth.unavailable" in [line["event"] for line in logs]
    assert_absent(repr(logs), [UNKNOWN], "the log")


def test_callers_that_are_not_trusted_learn_nothing(
    gate: Gate, store: Store, tmp_path: Path
) -> None:
    gate.member("bob")
    pat = gate.pat("bob")
    original = {"x-auth-token": pat.token}
    for caller in (
        {},
        {"X-Tokenwarden-Key": "wrong-key-wrong-key-wrong"},
        {"X-Tokenwarden-Key": PRODUCER},
        {"Authorization": f"Bearer {KEY}"},  # the client's own header, forwarded
    ):
        answer = gate.client.get("/v1/auth", headers=caller | original)
        assert (answer.status_code, answer.content, identity(answer)) == (401, b"", {})
    inside = Gate(store, tmp_path / "inside", peer="10.1.2.3")
    outside = Gate(store, tmp_path / "outside", peer="192.168.1.9")
    try:
        assert inside.client.get("/v1/auth", headers=original).status_code == 200
        assert outside.client.get("/v1/auth", headers=original).status_code == 401
        assert outside.client.get("/v1/auth", headers=original | GATEWAY).status_code == 200
    finally:
        inside.close()
        outside.close()


def test_a_16_kib_original_uri_is_refused_not_a_crash(gate: Gate) -> None:
    gate.member("bob")
    pat = gate.pat("bob")
    answer = gate.auth({}, f"/{'a' * (16 * 1024)}/{pat.token}")
    assert answer.status_code in (401, 431)
    assert gate.auth({}, f"/{pat.token}").status_code == 200


def test_refusals_are_counted_and_no_token_text_is_logged(
    gate: Gate, captured_logs: io.StringIO
) -> None:
    gate.member("bob")
    gate.member("carol")
    pat, leaver = gate.pat("bob"), gate.pat("carol")
    gate.remove("carol")
    with structlog.testing.capture_logs() as logs:
        for text in (pat.token, leaver.token, UNKNOWN, pat.token[:-2]):
            for headers, uri in forms(text):
                gate.auth(headers, uri)
            gate.client.get("/v1/auth", headers={"x-auth-token": text})
        gate.auth({}, "/")
        page = gate.client.get("/metrics").text
        gate.close()
    assert {line["event"] for line in logs} >= {"forward_auth.refused", "introspection.refused"}
    written = repr(logs) + captured_logs.getvalue() + repr([vars(r) for r in gate.refusals()])
    assert_absent(written, [pat.token, leaver.token, UNKNOWN], "the log or the audit")
    counted = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in page.splitlines()
        if line.startswith("tokenwarden_forward_auth_total")
    }
    assert counted['tokenwarden_forward_auth_total{result="active"}'] == 5
    assert counted['tokenwarden_forward_auth_total{result="revoked"}'] == 5
    assert counted['tokenwarden_forward_auth_total{result="unknown"}'] == 5
    assert counted['tokenwarden_forward_auth_total{result="malformed"}'] == 5
    assert counted['tokenwarden_forward_auth_total{result="untrusted_caller"}'] == 4
    assert counted['tokenwarden_forward_auth_total{result="no_token"}'] == 1


# --- a real nginx in front of a tiny service ----------------------------------------------


class Upstream(ThreadingHTTPServer):
    """The service behind nginx: it answers what X-Token-* headers it got, and counts."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.seen: list[dict[str, str]] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Echo(BaseHTTPRequestHandler):
    server: Upstream

    def do_GET(self) -> None:
        got = {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-token-")}
        self.server.seen.append(got)
        body = json.dumps(got).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def nginx_config(tmp: Path, *, api_port: int, service_port: int, port: int) -> Path:
    """The README's configuration with this run's addresses and key, in a main config."""
    server = NGINX_CONF.read_text()
    for placeholder, value in {
        "127.0.0.1:8000": f"127.0.0.1:{api_port}",
        "127.0.0.1:9000": f"127.0.0.1:{service_port}",
        "listen 8080;": f"listen 127.0.0.1:{port};",
        "twi_replace_with_an_introspection_key": KEY,
    }.items():
        assert placeholder in server
        server = server.replace(placeholder, value)
    (tmp / "forward-auth.conf").write_text(server)
    temp = "".join(f"    {name}_temp_path {tmp / name};\n" for name in ("client_body", "proxy"))
    main = tmp / "nginx.conf"
    main.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + "worker_processes 1;\nevents { worker_connections 64; }\nhttp {\n"
        + f"    access_log {tmp / 'access.log'};\n{temp}"
        + f"    include {tmp / 'forward-auth.conf'};\n}}\n"
    )
    return main


def wait_for_nginx(url: str, process: subprocess.Popen[bytes], error_log: Path) -> None:
    """Until nginx answers (a request with no token: 401), or fail with its error log."""
    for _ in range(150):
        if process.poll() is not None:
            break
        try:
            if httpx.get(f"{url}/", timeout=1.0).status_code == 401:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    log = error_log.read_text(errors="replace") if error_log.exists() else ""
    raise AssertionError(f"nginx did not start:\n{log}")


@pytest.fixture
def gateway(store: Store, tmp_path: Path) -> Iterator[tuple[str, Upstream, LiveStack, Gate]]:
    """nginx on a free port, in front of the echoing service, asking a real API process."""
    if not os.environ.get(NGINX_FLAG):
        pytest.skip(f"a real nginx: set {NGINX_FLAG}=1 (.ci/run does)")
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None
    )
    if nginx is None:
        pytest.fail(f"{NGINX_FLAG} is set but nginx is not installed", pytrace=False)
    home = tmp_path / "api"
    home.mkdir()
    env = stack_env(
        home, {"TOKENWARDEN_DATABASE_URL": store.url, "TOKENWARDEN_INTROSPECTION_KEYS": KEY}
    )
    api = LiveStack(home, env, store.url, free_port())
    upstream = Upstream()
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    conf_dir = tmp_path / "nginx"
    conf_dir.mkdir()
    port = free_port()
    main = nginx_config(conf_dir, api_port=api.port, service_port=upstream.port, port=port)
    argv = [nginx, "-e", str(conf_dir / "error.log"), "-p", str(conf_dir), "-c", str(main)]
    directives = f"daemon off; pid {conf_dir / 'nginx.pid'}; error_log {conf_dir / 'error.log'};"
    process: subprocess.Popen[bytes] | None = None
    helper = Gate.__new__(Gate)
    helper.store = store
    try:
        api.start("api")
        process = subprocess.Popen(
            [*argv, "-g", directives],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        wait_for_nginx(url, process, conf_dir / "error.log")
        yield url, upstream, api, helper
    finally:
        if process is not None:
            os.killpg(process.pid, signal.SIGQUIT)
            process.wait(timeout=15)
        api.stop()
        upstream.shutdown()
        upstream.server_close()
        store.truncate()


@pytest.mark.slow
def test_nginx_lets_active_tokens_through_with_their_identity_only(
    gateway: tuple[str, Upstream, LiveStack, Gate],
) -> None:
    url, upstream, api, helper = gateway
    helper.member("bob", "admin")
    pat, aat = helper.pat("bob"), helper.aat("ci", "bob")
    spoofed = {"X-Token-Role": "owner", "X-Token-App": "root", "X-Token-Org": "evil"}
    for issued, expected in (
        (pat, {"x-token-kind": "personal", "x-token-user": "bob", "x-token-role": "admin"}),
        (aat, {"x-token-kind": "application", "x-token-app": "ci"}),
    ):
        for headers, uri in forms(issued.token):
            before = len(upstream.seen)
            answer = httpx.get(url + uri, headers=headers | spoofed, timeout=10)
            assert answer.status_code == 200, (uri, answer.text)
            assert len(upstream.seen) == before + 1
            assert upstream.seen[-1] == {
                "x-token-id": issued.id,
                "x-token-org": "acme",
                **expected,
            }, uri
    huge = "/" + "a" * (16 * 1024) + f"/{pat.token}"
    direct = httpx.get(
        f"{api.api_url}/v1/auth", headers=GATEWAY | {"X-Original-URI": huge}, timeout=10
    )
    assert direct.status_code in (400, 401, 431)
    assert httpx.get(url + huge, timeout=10).status_code in (401, 414)
    assert httpx.get(f"{api.api_url}/healthz", timeout=10).status_code == 200
    for issued in (pat, aat):
        assert issued.token not in api.log("api")


@pytest.mark.slow
def test_nginx_refuses_unknown_malformed_and_a_leaver_right_after_membership_removed(
    gateway: tuple[str, Upstream, LiveStack, Gate], store: Store
) -> None:
    url, upstream, api, helper = gateway
    helper.member("bob")
    helper.member("carol")
    stays, leaver = helper.pat("bob"), helper.pat("carol")

    def status(headers: dict[str, str], uri: str) -> int:
        return httpx.get(url + uri, headers=headers, timeout=10).status_code

    typo = stays.token[:-1] + ("1" if stays.token.endswith("0") else "0")
    for text in (UNKNOWN, typo, "sm_pat_short", "index.html"):
        for headers, uri in forms(text):
            assert status(headers, uri) == 401, uri
    assert upstream.seen == []
    for headers, uri in forms(leaver.token):
        assert status(headers, uri) == 200, uri
    api.start("worker")
    api.send(event("membership.removed", {"org_id": "acme", "user_id": "carol"}))
    api.wait_for(
        lambda: api.verify(leaver.token).reason == "revoked",
        timeout=30,
        message="the worker to apply membership.removed",
    )

    seen = len(upstream.seen)
    for headers, uri in forms(leaver.token):
        if store.backend == "sqlite":
            assert status(headers, uri) == 401, uri  # the very next request
        else:  # the notice reaches the API process at the commit; 100 ms is the bench's bound
            eventually(lambda h=headers, u=uri: status(h, u) == 401, within=1.0)  # type: ignore[misc]
    assert len(upstream.seen) == seen
    assert status({}, f"/{stays.token}") == 200
    assert leaver.token not in api.log("api")


def test_the_readme_shows_the_tested_nginx_configuration() -> None:
    readme = (REPO / "README.md").read_text()
    assert NGINX_CONF.read_text().strip() in readme


def test_a_peer_setting_that_is_not_a_network_names_its_variable() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(forward_auth_peers="10.0.0.1/8")
    message = str(refused.value)
    assert message.startswith("TOKENWARDEN_FORWARD_AUTH_PEERS")
    assert "\n" not in message
    peers = load_settings(forward_auth_peers=" 10.0.0.0/8 , ::1,192.0.2.7").forward_auth_peers
    assert [str(network) for network in peers] == ["10.0.0.0/8", "::1/128", "192.0.2.7/32"]
