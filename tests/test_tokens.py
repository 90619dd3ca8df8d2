"""The token format: what scanners and services can tell from the text alone."""

from __future__ import annotations

import hashlib
import re
from urllib.parse import quote, urlencode

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tokenwarden.worker.domain.models import TokenKind
from tokenwarden.worker.domain.tokens import (
    ALPHABET,
    ExtractError,
    checksum,
    from_header,
    from_url,
    generate,
    hash_token,
    hint,
    kind_of,
)

SHAPES = {
    TokenKind.PERSONAL: re.compile(r"(sm_pat_)[a-zA-Z0-9]{12,}"),
    TokenKind.APPLICATION: re.compile(r"(sm_aat_)[a-zA-Z0-9]{12,}"),
}
KIND_BY_TEXT = {"sm_pat_": TokenKind.PERSONAL, "sm_aat_": TokenKind.APPLICATION}
PREFIX_LENGTH = len("sm_pat_")
BODY = slice(PREFIX_LENGTH, PREFIX_LENGTH + 32)
# Segments that steer from_url to another form; generated filler paths must avoid them.
SPECIAL_SEGMENTS = {"api", "v0", "ext", "bc", "C", "rpc"}

# Timing is not the property under test: a loaded CI machine must not fail these.
NO_DEADLINE = settings(deadline=None)

kinds = st.sampled_from(list(TokenKind))
issued = st.builds(generate, kinds)


@st.composite
def built_tokens(draw: st.DrawFn) -> str:
    """Tokens of the documented layout from drawn bodies, so failures shrink to a readable one."""
    prefix = draw(st.sampled_from(["sm_pat_", "sm_aat_"]))
    head = prefix + draw(st.text(alphabet=ALPHABET, min_size=32, max_size=32))
    return head + checksum(head)


tokens = st.one_of(issued, built_tokens())

hosts = st.builds(
    lambda labels, tld, port: ".".join([*labels, tld]) + (f":{port}" if port else ""),
    st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True), max_size=3),
    st.sampled_from(["example", "com", "io", "internal", "localhost"]),
    st.one_of(st.none(), st.integers(min_value=1, max_value=65535)),
)
segments = st.text(
    alphabet=st.characters(codec="ascii", categories=["L", "N"], include_characters="-._~"),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in SPECIAL_SEGMENTS and s not in {".", ".."})
paths = st.lists(segments, max_size=4)
param_names = st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True).filter(lambda n: n != "token")
params = st.lists(st.tuples(param_names, st.text(max_size=12)), max_size=3)


def query(pairs: list[tuple[str, str]]) -> str:
    return urlencode(pairs)


def prefixed(path: list[str]) -> str:
    return "".join(f"/{quote(segment, safe='')}" for segment in path)


@NO_DEADLINE
@given(kinds)
def test_generated_tokens_have_the_documented_shape(kind: TokenKind) -> None:
    token = generate(kind)

    assert SHAPES[kind].fullmatch(token)
    assert len(token) == 45
    assert kind_of(token) is kind


@NO_DEADLINE
@given(built_tokens())
def test_any_body_with_its_checksum_is_accepted(token: str) -> None:
    assert kind_of(token) is KIND_BY_TEXT[token[:PREFIX_LENGTH]]


def test_generated_tokens_are_distinct() -> None:
    many = {generate(TokenKind.PERSONAL) for _ in range(500)}
    assert len(many) == 500
    # The body draws from the whole alphabet, not a corner of it.
    assert len({char for token in many for char in token[BODY]}) == len(ALPHABET)


@NO_DEADLINE
@given(tokens, st.data())
def test_a_substituted_character_is_refused(token: str, data: st.DataObject) -> None:
    index = data.draw(st.integers(min_value=PREFIX_LENGTH, max_value=len(token) - 1))
    replacement = data.draw(st.sampled_from(ALPHABET).filter(lambda c: c != token[index]))
    typo = token[:index] + replacement + token[index + 1 :]

    assert kind_of(typo) is None


@NO_DEADLINE
@given(tokens, st.data())
def test_a_deleted_character_is_refused(token: str, data: st.DataObject) -> None:
    index = data.draw(st.integers(min_value=PREFIX_LENGTH, max_value=len(token) - 1))

    assert kind_of(token[:index] + token[index + 1 :]) is None


@NO_DEADLINE
@given(tokens, st.data())
def test_an_inserted_character_is_refused(token: str, data: st.DataObject) -> None:
    index = data.draw(st.integers(min_value=PREFIX_LENGTH, max_value=len(token)))
    extra = data.draw(st.sampled_from(ALPHABET))

    assert kind_of(token[:index] + extra + token[index:]) is None


@NO_DEADLINE
@given(tokens, st.data())
def test_swapped_neighbours_are_refused(token: str, data: st.DataObject) -> None:
    index = data.draw(st.integers(min_value=PREFIX_LENGTH, max_value=len(token) - 2))
    assume(token[index] != token[index + 1])
    swapped = token[:index] + token[index + 1] + token[index] + token[index + 2 :]

    assert kind_of(swapped) is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sm_pat_",
        "sm_xat_" + "A" * 38,
        "SM_PAT_" + "A" * 38,
        "sm_pat_" + "A" * 37 + "!",
    ],
)
def test_text_that_is_not_a_token_is_refused(text: str) -> None:
    assert kind_of(text) is None


@NO_DEADLINE
@given(
    st.sampled_from(["sm_pat_", "sm_aat_"]),
    st.text(
        alphabet=st.one_of(st.sampled_from(ALPHABET), st.characters()), min_size=38, max_size=38
    ),
)
def test_any_text_of_token_length_gets_an_answer_not_an_exception(prefix: str, tail: str) -> None:
    answer = kind_of(prefix + tail)

    assert answer is None or (prefix + tail).isascii()
    assert answer in {None, KIND_BY_TEXT[prefix]}


@NO_DEADLINE
@given(tokens)
def test_the_other_prefix_or_surrounding_text_is_refused(token: str) -> None:
    other = "sm_aat_" if token.startswith("sm_pat_") else "sm_pat_"

    assert kind_of(other + token[PREFIX_LENGTH:]) is None
    assert kind_of(f" {token}") is None
    assert kind_of(f"{token}\n") is None


@NO_DEADLINE
@given(tokens)
def test_hash_is_sha256_hex_and_hint_is_the_last_four(token: str) -> None:
    digest = hash_token(token)

    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert token not in digest
    assert hint(token) == token[-4:]
    assert len(hint(token)) == 4


@NO_DEADLINE
@given(tokens, hosts, params)
def test_url_with_the_token_as_the_only_segment(
    token: str, host: str, extra: list[tuple[str, str]]
) -> None:
    tail = f"?{query(extra)}" if extra else ""

    assert from_url(f"https://{host}/{token}{tail}") == token
    assert from_url(f"https://{host}/{token}/{tail}") == token


@NO_DEADLINE
@given(tokens, hosts, paths, params)
def test_url_with_the_token_as_the_last_segment(
    token: str, host: str, path: list[str], extra: list[tuple[str, str]]
) -> None:
    tail = f"?{query(extra)}" if extra else ""

    assert from_url(f"https://{host}{prefixed(path)}/{token}{tail}") == token
    assert from_url(f"http://{host}{prefixed(path)}/{token}/") == token


@NO_DEADLINE
@given(tokens, hosts, paths, params, params)
def test_url_with_the_token_query_parameter(
    token: str,
    host: str,
    path: list[str],
    before: list[tuple[str, str]],
    after: list[tuple[str, str]],
) -> None:
    pairs = query([*before, ("token", token), *after])

    assert from_url(f"https://{host}{prefixed(path)}?{pairs}") == token
    assert from_url(f"https://{host}{prefixed(path)}/?{pairs}") == token
    # The parameter wins over a path segment that looks like another token.
    assert from_url(f"https://{host}/{generate(TokenKind.PERSONAL)}?{pairs}") == token


@NO_DEADLINE
@given(tokens, hosts, st.lists(segments, min_size=1, max_size=3), params)
def test_ipfs_style_url(
    token: str, host: str, method: list[str], args: list[tuple[str, str]]
) -> None:
    tail = f"?{query(args)}" if args else ""

    assert from_url(f"https://{host}/{token}/api/v0/{'/'.join(method)}{tail}") == token
    assert from_url(f"https://{host}/{token}/api/v0/add?arg=x") == token


@NO_DEADLINE
@given(tokens, hosts, paths)
def test_avalanche_style_url(token: str, host: str, path: list[str]) -> None:
    assert from_url(f"https://{host}/ext/bc/C/rpc/{token}") == token
    assert from_url(f"https://{host}{prefixed(path)}/ext/bc/C/rpc/{token}") == token


@pytest.mark.parametrize(
    "url",
    [
        "/sm_pat_abc",
        "svc.example/sm_pat_abc",
        "//svc.example/sm_pat_abc",
        "?token=sm_pat_abc",
        "https://svc.example",
        "https://svc.example/",
        "https://svc.example/?x=1",
        "https://svc.example//?token=",
        "",
    ],
)
def test_url_without_a_token_is_an_error(url: str) -> None:
    with pytest.raises(ExtractError):
        from_url(url)


@NO_DEADLINE
@given(tokens, st.sampled_from(["x-auth-token", "X-Auth-Token", "X-AUTH-TOKEN", "x-Auth-token"]))
def test_header_name_is_case_insensitive_and_whitespace_is_trimmed(token: str, name: str) -> None:
    assert from_header(f"{name}: {token}") == token
    assert from_header(f"{name}:{token}") == token
    assert from_header(f"  {name} :\t{token}  \r\n") == token


@pytest.mark.parametrize(
    "header",
    [
        "authorization: Bearer sm_pat_abc",
        "x-auth-tokens: sm_pat_abc",
        "x-auth: sm_pat_abc",
        "x-auth-token sm_pat_abc",
        "sm_pat_abc",
        "x-auth-token:",
        "x-auth-token:   ",
        "",
    ],
)
def test_header_without_a_token_is_an_error(header: str) -> None:
    with pytest.raises(ExtractError):
        from_header(header)
