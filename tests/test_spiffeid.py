"""SPIFFE IDs exactly as the spec writes them (broker/spiffeid.py): table, then hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.spiffeid import SpiffeIdError, parse_spiffe_id, parse_trust_domain, printable

GOOD = [
    "spiffe://example.org/ns/prod/sa/orders",
    "spiffe://td.test",
    "spiffe://a-b_c.d/x.y-z_0/A",  # paths are case-sensitive and may hold upper case
]
BAD = [
    ("spiffe://TD.TEST/x", "must be lower case"),  # issue 19.6: was lower-cased and accepted
    ("spiffe://Example.org/x", "must be lower case"),
    ("SPIFFE://example.org/x", "must be lower case"),
    ("Spiffe://example.org/x", "must be lower case"),
    ("spiffe://example.org/a\x00b", "invalid character"),
    ("spiffe://example.org/a\nb", "invalid character"),
    ("spiffe://example.org/a/../b", "'.' and '..'"),
    ("spiffe://example.org/a//b", "empty segments"),
    ("spiffe://example.org/a%41", "invalid character"),
    ("spiffe://user@example.org/x", "disallowed characters"),
    ("spiffe://example.org:8443/x", "disallowed characters"),
    ("https://example.org/x", "does not start with"),
    ("spiffe://" + "a" * 2050, "longer than"),
]


@pytest.mark.parametrize("text", GOOD)
def test_canonical_ids_are_accepted_unchanged(text: str) -> None:
    assert str(parse_spiffe_id(text)) == text


@pytest.mark.parametrize(("text", "why"), BAD)
def test_non_canonical_ids_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(SpiffeIdError) as raised:
        parse_spiffe_id(text)
    message = str(raised.value)
    assert why in message
    # The input is quoted escaped: no control character reaches a log line or a reply.
    assert message.isprintable(), message


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("TD.test", "did you mean 'td.test'"),
        ("spiffe://td.test", "give the name alone"),
        ("a b", "disallowed characters"),
        ("", "cannot be empty"),
    ],
)
def test_trust_domain_names(text: str, why: str) -> None:
    assert parse_trust_domain("td.test").name == "td.test"
    with pytest.raises(SpiffeIdError, match=why):
        parse_trust_domain(text)


def test_printable_escapes_and_cuts() -> None:
    assert printable("a\x00b\r\nc\u2028") == "a\\x00b\\x0d\\x0ac\\u2028"
    assert printable("x" * 10, limit=4) == "xxxx..."


@given(st.text(max_size=300))
def test_any_text_is_an_id_or_a_clean_refusal(text: str) -> None:
    try:
        spiffe_id = parse_spiffe_id(text)
    except SpiffeIdError as exc:
        assert str(exc).isprintable()
    else:
        # Whatever is accepted is its own canonical form: no normalisation ever happens.
        assert str(spiffe_id) == text
        assert spiffe_id.trust_domain.name == spiffe_id.trust_domain.name.lower()


@given(
    st.from_regex(r"spiffe://[a-z0-9._-]{1,20}(/[A-Za-z0-9._-]{1,10}){0,4}", fullmatch=True),
)
def test_generated_valid_ids_round_trip(text: str) -> None:
    segments = text[len("spiffe://") :].split("/")[1:]
    if any(s in (".", "..") for s in segments):
        with pytest.raises(SpiffeIdError):
            parse_spiffe_id(text)
    else:
        assert str(parse_spiffe_id(text)) == text
        with pytest.raises(SpiffeIdError):
            parse_spiffe_id(text.replace("spiffe://", "spiffe://X", 1))
