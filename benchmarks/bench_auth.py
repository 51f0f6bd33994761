"""pytest-benchmark suite: request signing (PROTOCOL.md §6), octo_core vs Python's ``hmac``.

One round = what one request costs: the client signs, the server verifies.

* ``octo-signingkey``: the raw C path, ``SigningKey.sign`` then ``SigningKey.verify``
  (pre-hashed HMAC pads, fields hashed piecewise, constant-time compare);
* ``octo-signer-authenticator``: the whole library path, ``Signer.headers`` (clock,
  16 random bytes, sign) then ``Authenticator.check`` (token lookup, verify, clock
  skew, nonce cache);
* ``py-hmac-new``: ``hmac.new(...).hexdigest()`` twice plus ``hmac.compare_digest``;
* ``py-hmac-digest``: the one-shot C ``hmac.digest`` twice plus ``compare_digest``.

Run with::

    python -m pytest benchmarks/bench_auth.py --benchmark-enable

Target: sign + verify <= 2 µs per request.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Any, Callable, Dict

import pytest

from octo_core._codec import SigningKey, sha256_hex
from octo_core.auth import Authenticator, Signer, StaticTokens

TOKEN = "3f9a1c0d5e7b2a4f8e6d0c1b2a394857"      # a 32-character token, like a KMS one
CALLER = "com.example.octo.caller"
SERVER = "com.example.octo.server"
SERVICE = "com.example.octo.EchoService"
METHOD = "echo"
TS = "1718000000000"
NONCE = "0123456789abcdef0123456789abcdef"
FIELDS = (CALLER, SERVER, SERVICE, METHOD, TS, NONCE)
BODY = bytes(range(256)) * 4                     # a 1 KiB request body
KEY = TOKEN.encode()
MESSAGE = "\n".join(FIELDS).encode()


def octo_signingkey() -> Callable[[], bool]:
    key = SigningKey(TOKEN)

    def request() -> bool:
        signature = key.sign(CALLER, SERVER, SERVICE, METHOD, TS, NONCE)
        return key.verify(signature, CALLER, SERVER, SERVICE, METHOD, TS, NONCE)
    return request


def octo_signingkey_body() -> Callable[[], bool]:
    key = SigningKey(TOKEN)

    def request() -> bool:
        signature = key.sign(CALLER, SERVER, SERVICE, METHOD, TS, NONCE, sha256_hex(BODY))
        return key.verify(signature, CALLER, SERVER, SERVICE, METHOD, TS, NONCE, sha256_hex(BODY))
    return request


def octo_signer_authenticator() -> Callable[[], bool]:
    signer = Signer(CALLER, TOKEN, SERVER)
    auth = Authenticator(StaticTokens({CALLER: TOKEN}), nonce_capacity=100_000)
    check = auth.check

    def request() -> bool:
        check(caller=CALLER, server_appkey=SERVER, service=SERVICE, method=METHOD,
              local_context=signer.headers(SERVICE, METHOD))
        return True
    return request


def py_hmac_new() -> Callable[[], bool]:
    def request() -> bool:
        signature = hmac.new(KEY, MESSAGE, hashlib.sha256).hexdigest()
        expected = hmac.new(KEY, MESSAGE, hashlib.sha256).hexdigest()
        return hmac.compare_digest(signature, expected)
    return request


def py_hmac_new_body() -> Callable[[], bool]:
    def request() -> bool:
        message = MESSAGE + b"\n" + hashlib.sha256(BODY).hexdigest().encode()
        signature = hmac.new(KEY, message, hashlib.sha256).hexdigest()
        message = MESSAGE + b"\n" + hashlib.sha256(BODY).hexdigest().encode()
        expected = hmac.new(KEY, message, hashlib.sha256).hexdigest()
        return hmac.compare_digest(signature, expected)
    return request


def py_hmac_digest() -> Callable[[], bool]:
    def request() -> bool:
        signature = hmac.digest(KEY, "\n".join(FIELDS).encode(), "sha256").hex()
        expected = hmac.digest(KEY, "\n".join(FIELDS).encode(), "sha256").hex()
        return hmac.compare_digest(signature, expected)
    return request


PEERS: Dict[str, Callable[[], Callable[[], bool]]] = {
    "octo-signingkey": octo_signingkey,
    "octo-signer-authenticator": octo_signer_authenticator,
    "py-hmac-new": py_hmac_new,
    "py-hmac-digest": py_hmac_digest,
}
BODY_PEERS: Dict[str, Callable[[], Callable[[], bool]]] = {
    "octo-signingkey": octo_signingkey_body,
    "py-hmac-new": py_hmac_new_body,
}


def test_peers_agree() -> None:
    """octo_core's signature is Python's hmac over the §6 string, with and without the body."""
    key = SigningKey(TOKEN)
    assert key.sign(*FIELDS) == hmac.new(KEY, MESSAGE, hashlib.sha256).hexdigest()
    with_body = MESSAGE + b"\n" + hashlib.sha256(BODY).hexdigest().encode()
    assert key.sign(*FIELDS, sha256_hex(BODY)) == hmac.new(KEY, with_body,
                                                          hashlib.sha256).hexdigest()
    for make in list(PEERS.values()) + list(BODY_PEERS.values()):
        assert make()() is True


@pytest.mark.parametrize("peer", list(PEERS))
def test_sign_and_verify(benchmark: Any, peer: str) -> None:
    """One request's signature work: client sign + server verify."""
    benchmark.group = "sign+verify per request"
    assert benchmark(PEERS[peer]()) is True


@pytest.mark.parametrize("peer", list(BODY_PEERS))
def test_sign_and_verify_with_body(benchmark: Any, peer: str) -> None:
    """The same with body signing on (SHA-256 of a 1 KiB body on each side)."""
    benchmark.group = "sign+verify per request, 1 KiB body signed"
    assert benchmark(BODY_PEERS[peer]()) is True
