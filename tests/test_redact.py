"""Redactor: each secret, its base64 and URL-encoded forms become ***; short values are left alone."""

from __future__ import annotations

import base64
import random
import re
from urllib.parse import quote, quote_plus

import pytest

from buildq.engine.redact import MASK, MIN_SECRET_LENGTH, Redactor, secret_forms, trie_pattern

SECRET = "s3cr3t/pa ss+word=é"


def test_plain_value_is_masked_everywhere_in_the_line() -> None:
    r = Redactor([SECRET])
    assert r.redact(f"a {SECRET} b {SECRET}") == "a *** b ***"


_B64 = base64.b64encode(SECRET.encode()).decode()


@pytest.mark.parametrize(
    "form",
    [
        _B64,
        _B64.rstrip("="),
        base64.urlsafe_b64encode(SECRET.encode()).decode(),
        quote(SECRET, safe=""),
        quote_plus(SECRET),
        re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(SECRET, safe="")),
    ],
)
def test_encoded_forms_are_masked(form: str) -> None:
    assert form != SECRET
    assert Redactor([SECRET]).redact(f"x={form};") == "x=***;"


def test_short_and_empty_values_are_ignored() -> None:
    r = Redactor(["", "a", "ab", "abc"])
    assert r.redact("a abc ab") == "a abc ab"
    assert MIN_SECRET_LENGTH == 4
    assert Redactor(["abcd"]).redact("xabcdx") == "x***x"


def test_no_secrets_is_identity() -> None:
    assert Redactor([]).redact("anything at all") == "anything at all"


def test_longest_secret_wins_when_one_contains_another() -> None:
    r = Redactor(["abcd", "abcdef"])
    assert r.redact("abcdefg abcde") == "***g ***e"


def test_regex_metacharacters_are_literal() -> None:
    r = Redactor(["a.b*c+(d)"])
    assert r.redact("a.b*c+(d) aXb*c+(d) aab*c+(d)") == "*** aXb*c+(d) aab*c+(d)"


def test_multiline_secret_is_masked_line_by_line_and_whole() -> None:
    key = "-----BEGIN KEY-----\nMIIEowIBAAKCAQEA\n-----END KEY-----\n"
    r = Redactor([key])
    assert r.redact("MIIEowIBAAKCAQEA") == MASK
    assert r.redact(key.strip()) == MASK
    assert "MIIEowIBAAKCAQEA" in secret_forms(key)


def test_surrounding_whitespace_of_a_secret_value_is_not_required() -> None:
    assert Redactor(["hunter22\n"]).redact("pw=hunter22.") == "pw=***."


def test_trie_pattern_matches_like_longest_first_alternation() -> None:
    rng = random.Random(7)
    words = {"".join(rng.choice("abc.") for _ in range(rng.randint(1, 6))) for _ in range(60)}
    plain = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))
    trie = re.compile(trie_pattern(words))
    for _ in range(300):
        text = "".join(rng.choice("abc.x") for _ in range(40))
        assert trie.sub("*", text) == plain.sub("*", text)


def test_callable_form() -> None:
    assert Redactor(["topsecret"])("a topsecret") == "a ***"
