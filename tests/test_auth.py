"""Request signing and access control (PROTOCOL.md §6).

Unit level: every signature octo_core makes equals Python's ``hmac`` over the
exact §6 string; token stores; ``Authenticator.check`` accepts a good request
and refuses each kind of bad one with a ``SecurityError`` (status 7) whose text
never carries a secret, counting refusals by reason; the nonce cache stays
bounded.

End to end over sockets: a ``Server(auth=...)`` and signed ``AsyncClient``s;
wrong, missing, replayed, expired, ungranted, IP-denied and native-thrift
requests are refused with status 7; ``sign_body`` catches a body tampered with
in flight (by a man-in-the-middle proxy in the test).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from typing import Any, AsyncIterator, Callable, List, Optional, Union

import pytest
from hypothesis import given, settings, strategies as st
from thriftpy2.thrift import TApplicationException, TMessageType

import octo_core
from octo_core import codec, protocol
from octo_core._codec import SigningKey, sha256_hex
from octo_core.auth import (NONCE_KEY, SIGN_KEY, TS_KEY, Authenticator, DerivedTokens, Signer,
                            StaticTokens)
from octo_core.errors import OctoError, SecurityError, ServiceError, Status, TransportError

from wire_helpers import (CLIENT_APPKEY, LOCALHOST, SERVER_APPKEY, Echo, EchoHandler,
                          async_client, decode_body, echo_services, raw_connection, run, serving,
                          thriftpy2_client, watchdog)  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

TOKEN = "tok-3f9a1c0d5e7b2a4f-client-secret"
OTHER_TOKEN = "tok-0000aaaa-other-caller-secret"
MASTER = b"master-secret-\x00\xff-kms"
OTHER_APPKEY = "com.example.wire.other"


# --- the reference: Python's hmac over the §6 string ------------------------------

def reference_string(caller: str, server: str, service: str, method: str, ts: str, nonce: str,
                     body: Optional[bytes] = None) -> bytes:
    parts = [caller, server, service, method, ts, nonce]
    if body is not None:
        parts.append(hashlib.sha256(body).hexdigest())
    return "\n".join(parts).encode("utf-8")


def reference_sign(token: Union[str, bytes], *fields: str, body: Optional[bytes] = None) -> str:
    key = token.encode("utf-8") if isinstance(token, str) else token
    return hmac.new(key, reference_string(*fields, body=body),
                    hashlib.sha256).hexdigest()


def now_ms(offset_s: float = 0.0) -> str:
    return str(int((time.time() + offset_s) * 1000))


def signed_context(token: Union[str, bytes], caller: str, service: str = "Echo", method: str = "echo", *,
                   server: str = SERVER_APPKEY, ts: Optional[str] = None,
                   nonce: Optional[str] = None, body: Optional[bytes] = None) -> dict:
    """A localContext signed by the reference implementation (not octo_core)."""
    ts = now_ms() if ts is None else ts
    nonce = os.urandom(16).hex() if nonce is None else nonce
    return {TS_KEY: ts, NONCE_KEY: nonce,
            SIGN_KEY: reference_sign(token, caller, server, service, method, ts, nonce, body=body)}


# A field text of any Unicode scalar value (surrogates cannot be UTF-8 encoded).
field_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


# --- SigningKey / sha256_hex / Signer -----------------------------------------------

@settings(max_examples=300, deadline=None)
@given(key=st.binary(max_size=200), fields=st.lists(field_text, min_size=6, max_size=6),
       body=st.one_of(st.none(), st.binary(max_size=300)))
def test_signing_key_equals_python_hmac(key, fields, body):
    expected = hmac.new(key, reference_string(*fields, body=body), hashlib.sha256).hexdigest()
    digest = None if body is None else hashlib.sha256(body).hexdigest()
    signing_key = SigningKey(key)
    assert signing_key.sign(*fields, digest) == expected
    assert signing_key.verify(expected, *fields, digest) is True
    assert signing_key.digest(b"abc") == hmac.new(key, b"abc", hashlib.sha256).digest()


@pytest.mark.parametrize("length", [0, 1, 31, 32, 55, 56, 63, 64, 65, 127, 128, 129, 1000])
def test_signing_key_every_key_length(length):
    # HMAC hashes keys longer than the 64-byte block; shorter ones are zero-padded
    key = bytes((i * 7 + 3) & 0xFF for i in range(length))
    fields = ("caller", "server", "Echo", "echo", "1700000000000", "ab" * 16)
    expected = hmac.new(key, "\n".join(fields).encode(), hashlib.sha256).hexdigest()
    assert SigningKey(key).sign(*fields) == expected
    assert SigningKey(bytearray(key)).sign(*fields) == expected


@pytest.mark.parametrize("size", [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1000, 100_000])
def test_sha256_hex_equals_hashlib(size):
    data = bytes((i * 13 + 5) & 0xFF for i in range(size))
    assert sha256_hex(data) == hashlib.sha256(data).hexdigest()
    assert sha256_hex(memoryview(data)) == hashlib.sha256(data).hexdigest()


def test_signing_key_str_key_is_its_utf8_bytes():
    fields = ("c", "s", "Svc", "m", "1", "2")
    assert SigningKey("клю\u00e7").sign(*fields) == SigningKey("клю\u00e7".encode()).sign(*fields)


def test_verify_rejects_any_other_signature():
    key = SigningKey(TOKEN)
    fields = (CLIENT_APPKEY, SERVER_APPKEY, "Echo", "echo", "1700000000000", "cd" * 16)
    good = key.sign(*fields)
    assert key.verify(good, *fields)
    for i in range(64):                      # one changed hex digit, anywhere
        bad = good[:i] + ("0" if good[i] != "0" else "1") + good[i + 1:]
        assert not key.verify(bad, *fields)
    for bad in ("", good[:63], good + "0", good.upper() if good.upper() != good else "x" * 64,
                "\u00e9" * 32, "\u00e9" * 64, " " * 64):
        assert not key.verify(bad, *fields), bad
    # any other field (or the body hash) changes the signature
    for i in range(6):
        changed = list(fields)
        changed[i] += "x"
        assert not key.verify(good, *changed)
    assert not key.verify(good, *fields, hashlib.sha256(b"").hexdigest())
    assert not SigningKey(TOKEN + "x").verify(good, *fields)


def test_signer_headers_match_the_reference():
    signer = Signer(CLIENT_APPKEY, TOKEN, SERVER_APPKEY)
    before = time.time() * 1000
    headers = signer.headers("Echo", "echo", b"ignored without sign_body")
    after = time.time() * 1000
    assert set(headers) == {TS_KEY, NONCE_KEY, SIGN_KEY}
    assert headers[TS_KEY].isdigit() and before - 1 <= int(headers[TS_KEY]) <= after + 1
    nonce = headers[NONCE_KEY]
    assert len(nonce) == 32 and nonce == nonce.lower() and bytes.fromhex(nonce)
    assert headers[SIGN_KEY] == reference_sign(TOKEN, CLIENT_APPKEY, SERVER_APPKEY, "Echo", "echo",
                                               headers[TS_KEY], nonce)
    nonces = {signer.headers("Echo", "echo")[NONCE_KEY] for _ in range(1000)}
    assert len(nonces) == 1000


def test_signer_with_body_hash_matches_the_reference():
    body = codec.encode_message("echo", TMessageType.CALL, 3, Echo.echo_args(text="payload"))
    signer = Signer(CLIENT_APPKEY, TOKEN, SERVER_APPKEY, sign_body=True)
    headers = signer.headers("Echo", "echo", body)
    assert headers[SIGN_KEY] == reference_sign(TOKEN, CLIENT_APPKEY, SERVER_APPKEY, "Echo", "echo",
                                               headers[TS_KEY], headers[NONCE_KEY], body=body)
    assert headers[SIGN_KEY] != reference_sign(TOKEN, CLIENT_APPKEY, SERVER_APPKEY, "Echo",
                                                "echo", headers[TS_KEY], headers[NONCE_KEY])


# --- token stores ------------------------------------------------------------------

@pytest.mark.parametrize("master", [MASTER, "text master secret \u00e9"])
def test_derived_tokens_are_the_hmac_of_the_appkey(master):
    raw = master.encode() if isinstance(master, str) else master
    store = DerivedTokens(master)
    for appkey in ("com.example.a", "com.example.b", "", "\u00fcnicode.appkey"):
        expected = hmac.new(raw, appkey.encode(), hashlib.sha256).digest()   # §6: the 32 bytes
        assert store.token(appkey) == expected
    assert store.token("a") != DerivedTokens(raw + b"x").token("a")


def test_static_tokens_from_json_file(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({CLIENT_APPKEY: TOKEN, OTHER_APPKEY: OTHER_TOKEN}))
    store = StaticTokens.from_file(str(path))
    assert store.token(CLIENT_APPKEY) == TOKEN
    assert store.token(OTHER_APPKEY) == OTHER_TOKEN
    assert store.token("com.example.nobody") is None


def test_static_tokens_from_lines_file(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(f"# appkey token\n\n  {CLIENT_APPKEY}   {TOKEN}  # the client\n"
                    f"{OTHER_APPKEY}\t{OTHER_TOKEN}\n   # trailing comment\n")
    store = StaticTokens.from_file(str(path))
    assert store.token(CLIENT_APPKEY) == TOKEN
    assert store.token(OTHER_APPKEY) == OTHER_TOKEN
    assert store.token("#") is None and store.token("") is None


def test_static_tokens_from_lines_file_keep_a_hash_inside_a_token(tmp_path):
    # a '#' within a token once cut it short, silently: "s3cr#et" served as "s3cr"
    path = tmp_path / "tokens.txt"
    path.write_text(f"{CLIENT_APPKEY} s3cr#et-{TOKEN} #the client\n{OTHER_APPKEY} {OTHER_TOKEN}#\n")
    store = StaticTokens.from_file(str(path))
    assert store.token(CLIENT_APPKEY) == f"s3cr#et-{TOKEN}"
    assert store.token(OTHER_APPKEY) == f"{OTHER_TOKEN}#"


def test_static_tokens_bad_line_names_the_line_not_the_secret(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(f"{CLIENT_APPKEY} {TOKEN}\nonly-one-field-{OTHER_TOKEN}\n")
    with pytest.raises(ValueError) as info:
        StaticTokens.from_file(str(path))
    assert ":2:" in str(info.value)
    assert OTHER_TOKEN not in str(info.value) and TOKEN not in str(info.value)


@pytest.mark.parametrize("text, error, says", [
    ('{"com.example.client": 12345}', TypeError, "not those of 'com.example.client'"),
    ('{"com.example.client": "s3cret",}', ValueError, "not JSON"),
])
def test_static_tokens_from_a_bad_json_file_name_the_file_not_the_secret(tmp_path, text, error,
                                                                          says):
    """A token that is no text was taken, and each of that caller's calls then
    failed at the server ("could not check this request"); a JSON error named no
    file."""
    path = tmp_path / "tokens.json"
    path.write_text(text)
    with pytest.raises(error) as info:
        StaticTokens.from_file(str(path))
    assert str(info.value).startswith(f"{path}: ") and says in str(info.value)
    assert "12345" not in str(info.value) and "s3cret" not in str(info.value)


def test_static_tokens_from_dict():
    store = StaticTokens({"a": "ta", "b": b"\x00raw", "none": None})
    assert store.token("a") == "ta" and store.token("b") == b"\x00raw"
    assert store.token("none") is None and store.token("c") is None
    with pytest.raises(TypeError, match="not those of 'n'"):
        Authenticator({"a": "ta", "n": 1.5})


# --- Authenticator.check -------------------------------------------------------------

def make_auth(**options) -> Authenticator:
    tokens = options.pop("tokens", StaticTokens({CLIENT_APPKEY: TOKEN, OTHER_APPKEY: OTHER_TOKEN}))
    return Authenticator(tokens, **options)


def check(auth: Authenticator, context: Optional[dict], *, caller: str = CLIENT_APPKEY,
          service: str = "Echo", method: str = "echo", body: Optional[bytes] = None,
          now: Optional[float] = None) -> None:
    auth.check(caller=caller, server_appkey=SERVER_APPKEY, service=service, method=method,
               local_context=context, body=body, now=now)


SECRETS = (TOKEN, OTHER_TOKEN, MASTER.decode("latin-1"))


def leaks(secret: Union[str, bytes], text: str) -> bool:
    """Does ``text`` show ``secret`` (a bytes token, a derived one, as its hex or its repr)?"""
    forms = [secret] if isinstance(secret, str) else [secret.hex(), repr(secret)[2:-1]]
    return any(form in text for form in forms)


def assert_refused(call: Callable[[], None], reason: str, auth: Authenticator,
                   also_secret: Union[str, bytes] = "") -> SecurityError:
    before = dict(auth.rejections)
    with pytest.raises(SecurityError) as info:
        call()
    error = info.value
    assert error.status == Status.SECURITY_EXCEPTION == 7
    text = f"{error} {error.message!r} {error.args!r}"
    assert text.startswith(reason) or reason in text
    for secret in SECRETS + ((also_secret,) if also_secret else ()):
        assert not leaks(secret, text), f"{reason}: the refusal leaks a secret: {text}"
    after = dict(auth.rejections)
    assert after.get(reason, 0) == before.get(reason, 0) + 1, (reason, before, after)
    assert sum(after.values()) == sum(before.values()) + 1
    return error


def test_good_request_passes_and_counts_nothing():
    auth = make_auth()
    check(auth, signed_context(TOKEN, CLIENT_APPKEY))
    check(auth, signed_context(OTHER_TOKEN, OTHER_APPKEY), caller=OTHER_APPKEY)
    assert sum(auth.rejections.values()) == 0


def test_octo_core_signer_passes_the_authenticator():
    auth = make_auth()
    signer = Signer(CLIENT_APPKEY, TOKEN, SERVER_APPKEY)
    for _ in range(10):
        check(auth, signer.headers("Echo", "echo"))


def test_unsigned_requests_are_refused():
    auth = make_auth()
    good = signed_context(TOKEN, CLIENT_APPKEY)
    assert_refused(lambda: check(auth, None), "unsigned", auth)
    assert_refused(lambda: check(auth, {}), "unsigned", auth)
    for missing in (TS_KEY, NONCE_KEY, SIGN_KEY):
        partial = {k: v for k, v in good.items() if k != missing}
        assert_refused(lambda: check(auth, partial), "unsigned", auth)
    assert_refused(lambda: check(auth, good, caller=""), "unsigned", auth)


def test_forged_signature_is_refused_without_leaking_the_right_one():
    auth = make_auth()
    context = signed_context(TOKEN, CLIENT_APPKEY)
    right = context[SIGN_KEY]
    context[SIGN_KEY] = "0" * 64
    error = assert_refused(lambda: check(auth, context), "bad-signature", auth, also_secret=right)
    assert right not in str(error)
    # a signature for another method, service or server is a forgery too
    for fields in (dict(method="ping"), dict(service="Calc")):
        other = signed_context(TOKEN, CLIENT_APPKEY, **fields)
        assert_refused(lambda: check(auth, other), "bad-signature", auth)
    other_server = signed_context(TOKEN, CLIENT_APPKEY, server="com.example.elsewhere")
    assert_refused(lambda: check(auth, other_server), "bad-signature", auth)


def test_wrong_key_is_refused():
    auth = make_auth()
    assert_refused(lambda: check(auth, signed_context(OTHER_TOKEN, CLIENT_APPKEY)),
                   "bad-signature", auth)
    assert_refused(lambda: check(auth, signed_context(TOKEN + "x", CLIENT_APPKEY)),
                   "bad-signature", auth)
    # claiming to be another caller with one's own token
    assert_refused(lambda: check(auth, signed_context(TOKEN, OTHER_APPKEY), caller=OTHER_APPKEY),
                   "bad-signature", auth)


def test_unknown_caller_is_refused_and_told_as_a_bad_signature():
    """Counted as unknown-caller, told as a bad signature: which appkeys hold
    tokens is not told to whoever asks."""
    auth = make_auth()
    with pytest.raises(SecurityError) as info:
        check(auth, signed_context(TOKEN, "com.example.nobody"), caller="com.example.nobody")
    assert str(info.value) == "bad-signature: the signature does not match"
    assert auth.rejections == {"unknown-caller": 1}


def test_checking_without_the_body_an_authenticator_signs_says_so():
    auth = make_auth(sign_body=True)
    with pytest.raises(TypeError, match="pass the request's body"):
        check(auth, signed_context(TOKEN, CLIENT_APPKEY, body=b"x"))


def test_a_request_refused_for_its_grants_keeps_no_nonce():
    """A caller the ACL grants nothing takes no room in the nonce cache (it would
    narrow the replay window for everyone)."""
    auth = make_auth(acl={CLIENT_APPKEY: ["Echo.echo"]}, nonce_capacity=4)
    for _ in range(10):
        assert_refused(lambda: check(auth, signed_context(TOKEN, CLIENT_APPKEY, method="ping"),
                                     method="ping"), "not-granted", auth)
    assert not auth._nonces._seen
    check(auth, signed_context(TOKEN, CLIENT_APPKEY))


@pytest.mark.parametrize("offset", [-61.0, 61.0, -3600.0, 86400.0 * 365])
def test_timestamp_beyond_skew_is_refused(offset):
    auth = make_auth()
    context = signed_context(TOKEN, CLIENT_APPKEY, ts=now_ms(offset))
    assert_refused(lambda: check(auth, context), "expired", auth)


@pytest.mark.parametrize("offset", [-55.0, 55.0, 0.0])
def test_timestamp_within_skew_passes(offset):
    check(make_auth(), signed_context(TOKEN, CLIENT_APPKEY, ts=now_ms(offset)))


def test_custom_skew_and_explicit_now():
    auth = make_auth(skew=5.0)
    ts = now_ms()
    context = signed_context(TOKEN, CLIENT_APPKEY, ts=ts)
    assert_refused(lambda: check(auth, context, now=int(ts) / 1000 + 6), "expired", auth)
    check(auth, signed_context(TOKEN, CLIENT_APPKEY, ts=ts), now=int(ts) / 1000 + 4)


@pytest.mark.parametrize("ts", ["abc", "", "1.5e12", "0x10", "9" * 400, "-" + "9" * 400],
                         ids=["letters", "empty", "float", "hex", "huge", "huge-negative"])
def test_malformed_timestamp_is_refused(ts):
    # a well-signed but malformed timestamp: always status 7, never another exception
    auth = make_auth()
    context = signed_context(TOKEN, CLIENT_APPKEY, ts=ts)
    reasons = ("unsigned",) if ts == "" else ("bad-timestamp", "expired")
    before = sum(auth.rejections.values())
    with pytest.raises(SecurityError) as info:
        check(auth, context)
    assert info.value.status == 7
    assert any(str(info.value).startswith(r) for r in reasons), str(info.value)
    assert sum(auth.rejections.values()) == before + 1


def test_replayed_nonce_is_refused():
    auth = make_auth()
    context = signed_context(TOKEN, CLIENT_APPKEY)
    check(auth, context)
    assert_refused(lambda: check(auth, dict(context)), "replayed", auth)
    assert_refused(lambda: check(auth, dict(context)), "replayed", auth)
    # a fresh nonce from the same caller passes
    check(auth, signed_context(TOKEN, CLIENT_APPKEY))


def test_forged_request_does_not_burn_the_nonce():
    # only an authentic request may claim a nonce: a forgery with the victim's
    # nonce must not make the victim's real request look replayed
    auth = make_auth()
    real = signed_context(TOKEN, CLIENT_APPKEY)
    forged = dict(real, **{SIGN_KEY: "f" * 64})
    assert_refused(lambda: check(auth, forged), "bad-signature", auth)
    check(auth, real)


def test_acl_wildcards():
    acl = {CLIENT_APPKEY: ["Echo.echo", "Echo.p*"], "com.example.wire.o*": ["Calc.*", "*.whoami"]}
    auth = make_auth(acl=acl)
    granted = [(CLIENT_APPKEY, TOKEN, "Echo", "echo"), (CLIENT_APPKEY, TOKEN, "Echo", "ping"),
               (OTHER_APPKEY, OTHER_TOKEN, "Calc", "add"),
               (OTHER_APPKEY, OTHER_TOKEN, "Echo", "whoami")]
    for caller, token, service, method in granted:
        check(auth, signed_context(token, caller, service, method), caller=caller,
              service=service, method=method)
    refused = [(CLIENT_APPKEY, TOKEN, "Echo", "fail"), (CLIENT_APPKEY, TOKEN, "Calc", "add"),
               (CLIENT_APPKEY, TOKEN, "Echo", "echo2"),   # no implicit prefix match
               (OTHER_APPKEY, OTHER_TOKEN, "Echo", "echo")]
    for caller, token, service, method in refused:
        context = signed_context(token, caller, service, method)
        assert_refused(lambda: check(auth, context, caller=caller, service=service, method=method),
                       "not-granted", auth)


def test_empty_acl_grants_nothing_and_none_grants_everything():
    context = signed_context(TOKEN, CLIENT_APPKEY)
    auth = make_auth(acl={})
    assert_refused(lambda: check(auth, context), "not-granted", auth)
    check(make_auth(acl=None), signed_context(TOKEN, CLIENT_APPKEY))


def test_acl_patterns_are_case_sensitive():
    auth = make_auth(acl={CLIENT_APPKEY: ["echo.ECHO"]})
    context = signed_context(TOKEN, CLIENT_APPKEY)
    assert_refused(lambda: check(auth, context), "not-granted", auth)


def test_ip_deny_and_allow_lists():
    auth = make_auth(deny=["10.1.0.0/16", "192.168.7.7"], allow=["10.0.0.0/8", "::1"])
    for ip in ("10.2.3.4", "10.255.0.1", "::1"):
        auth.check_peer(ip)
    for ip in ("10.1.2.3", "10.1.255.255"):        # deny wins over allow
        assert_refused(lambda: auth.check_peer(ip), "ip-denied", auth)
    for ip in ("127.0.0.1", "192.168.7.7", "8.8.8.8", "::2", None, "not-an-ip"):
        assert_refused(lambda: auth.check_peer(ip), "ip-denied", auth)


def test_ip_deny_only():
    auth = make_auth(deny=["127.0.0.0/8", "fe80::/10"])
    for ip in ("10.0.0.1", "::1", "128.0.0.1"):
        auth.check_peer(ip)
    for ip in ("127.0.0.1", "127.255.255.254", "fe80::1"):
        assert_refused(lambda: auth.check_peer(ip), "ip-denied", auth)
    auth.check_peer(None)        # a unix socket peer has no IP: only an allow list refuses it


def test_ip_lists_off_let_everyone_in():
    auth = make_auth()
    for ip in ("127.0.0.1", "::1", None, "garbage"):
        auth.check_peer(ip)
    assert sum(auth.rejections.values()) == 0


def test_ipv4_mapped_ipv6_peer_is_still_denied():
    # the same IPv4 peer seen through a dual-stack socket must not slip past an IPv4 deny list
    auth = make_auth(deny=["127.0.0.0/8"])
    assert_refused(lambda: auth.check_peer("::ffff:127.0.0.1"), "ip-denied", auth)
    # nor past a rule written the mapped way (matching nothing, it would fail open)
    for rule in ("::ffff:127.0.0.1", "::ffff:127.0.0.0/104"):
        auth = make_auth(deny=[rule])
        for peer in ("127.0.0.1", "::ffff:127.0.0.1"):
            assert_refused(lambda: auth.check_peer(peer), "ip-denied", auth)
        auth.check_peer("10.0.0.1")


def test_rejection_counters_per_reason():
    auth = make_auth(acl={CLIENT_APPKEY: ["Echo.echo"]}, deny=["192.0.2.0/24"])
    replay = signed_context(TOKEN, CLIENT_APPKEY)
    check(auth, replay)
    attempts = {
        "unsigned": [lambda: check(auth, None)] * 3,
        "unknown-caller": [lambda: check(auth, signed_context(TOKEN, "x"), caller="x")] * 2,
        "bad-signature": [lambda: check(auth, signed_context(OTHER_TOKEN, CLIENT_APPKEY))] * 4,
        "expired": [lambda: check(auth, signed_context(TOKEN, CLIENT_APPKEY, ts=now_ms(-999)))],
        "replayed": [lambda: check(auth, replay)] * 2,
        "not-granted": [lambda: check(auth, signed_context(TOKEN, CLIENT_APPKEY, method="ping"),
                                      method="ping")] * 5,
        "ip-denied": [lambda: auth.check_peer("192.0.2.9")] * 6,
        "bad-timestamp": [lambda: check(auth, signed_context(TOKEN, CLIENT_APPKEY, ts="soon"))],
    }
    for attempt_list in attempts.values():
        for attempt in attempt_list:
            with pytest.raises(SecurityError):
                attempt()
    assert dict(auth.rejections) == {reason: len(v) for reason, v in attempts.items()}


def test_a_full_nonce_cache_forgets_its_oldest_and_lets_no_replay_through():
    capacity = 256
    auth = make_auth(nonce_capacity=capacity, skew=5.0)
    t0 = time.time()
    signed = [signed_context(TOKEN, CLIENT_APPKEY, ts=str(int(t0 * 1000))) for _ in range(capacity)]
    for context in signed:
        check(auth, context, now=t0)
    assert len(auth._nonces._seen) == capacity
    # as old as the oldest remembered: it would be the one forgotten
    assert_refused(lambda: check(auth, signed_context(TOKEN, CLIENT_APPKEY,
                                                      ts=str(int(t0 * 1000))), now=t0 + 1),
                   "nonce-cache-full", auth)
    # signed later: taken, and one of the oldest forgotten for it ...
    check(auth, signed_context(TOKEN, CLIENT_APPKEY, ts=str(int((t0 + 1) * 1000))), now=t0 + 1)
    assert len(auth._nonces._seen) == capacity
    # ... yet none of them passes again: what was signed as early as it is refused
    for context in signed:
        with pytest.raises(SecurityError):
            check(auth, dict(context), now=t0 + 1)
    assert auth.rejections["replayed"] == capacity - 1
    # once their timestamps leave the window, the nonces go and new ones are taken
    later = t0 + 7
    check(auth, signed_context(TOKEN, CLIENT_APPKEY, ts=str(int(later * 1000))), now=later)
    assert len(auth._nonces._seen) == 1


def test_a_caller_flooding_the_nonce_cache_locks_no_one_out():
    """One caller signing far more than the cache holds narrows the replay window
    to its last requests; another caller's request, signed now, still passes."""
    auth = make_auth(nonce_capacity=100, skew=60.0)
    t0 = time.time()
    for i in range(1000):     # a thousand requests, a millisecond apart
        check(auth, signed_context(OTHER_TOKEN, OTHER_APPKEY, ts=str(int(t0 * 1000) + i)),
              caller=OTHER_APPKEY, now=t0 + i / 1000)
    assert len(auth._nonces._seen) == 100
    now = t0 + 1
    check(auth, signed_context(TOKEN, CLIENT_APPKEY, ts=str(int(now * 1000))), now=now)
    # one signed before the flood's last hundred is refused, not let through unremembered
    assert_refused(lambda: check(auth, signed_context(TOKEN, CLIENT_APPKEY,
                                                      ts=str(int(t0 * 1000) + 500)), now=now),
                   "nonce-cache-full", auth)


@pytest.mark.parametrize("ts, nonce, reason", [
    (" 1700000000000", None, "bad-timestamp"),
    ("1_700_000_000_000", None, "bad-timestamp"),
    ("\u0661\u0662", None, "bad-timestamp"),                  # Arabic-Indic digits
    (None, "ab" * 16 + "00", "bad-nonce"),                   # 17 bytes
    (None, "AB" * 16, "bad-nonce"),                          # uppercase
    (None, "x" * 32, "bad-nonce"),
])
def test_timestamp_and_nonce_must_have_their_section_6_form(ts, nonce, reason):
    auth = make_auth()
    context = signed_context(TOKEN, CLIENT_APPKEY, ts=ts, nonce=nonce)
    assert_refused(lambda: check(auth, context), reason, auth)


def test_nonce_cache_forgets_nonces_older_than_the_window():
    auth = make_auth(skew=1.0)
    t0 = time.time()
    for i in range(100):
        check(auth, signed_context(TOKEN, CLIENT_APPKEY, ts=str(int(t0 * 1000))), now=t0)
    assert len(auth._nonces._seen) == 100
    later = t0 + 10
    check(auth, signed_context(TOKEN, CLIENT_APPKEY, ts=str(int(later * 1000))), now=later)
    assert len(auth._nonces._seen) == 1


def test_derived_tokens_authenticator():
    store = DerivedTokens(MASTER)
    token = store.token(CLIENT_APPKEY)
    auth = make_auth(tokens=store)
    check(auth, signed_context(token, CLIENT_APPKEY))
    # any appkey has a derived token; signing with the master itself is a forgery
    context = signed_context(MASTER.decode("latin-1"), CLIENT_APPKEY)
    assert_refused(lambda: check(auth, context), "bad-signature", auth, also_secret=token)


def test_sign_body_authenticator():
    auth = make_auth(sign_body=True)
    body = codec.encode_message("echo", TMessageType.CALL, 1, Echo.echo_args(text="hello"))
    check(auth, signed_context(TOKEN, CLIENT_APPKEY, body=body), body=body)
    tampered = body.replace(b"hello", b"jello")
    context = signed_context(TOKEN, CLIENT_APPKEY, body=body)
    assert_refused(lambda: check(auth, context, body=tampered), "bad-signature", auth)
    # a signature without the body hash does not pass a body-signing server
    context = signed_context(TOKEN, CLIENT_APPKEY)
    assert_refused(lambda: check(auth, context, body=body), "bad-signature", auth)


# --- end to end over sockets ---------------------------------------------------------

def server_auth(**options) -> Authenticator:
    return make_auth(**options)


@contextlib.asynccontextmanager
async def signed_client(address: str, token: Optional[Union[str, bytes]] = TOKEN, **options
                        ) -> AsyncIterator[octo_core.AsyncClient]:
    options.setdefault("remote_appkey", SERVER_APPKEY)
    async with async_client(Echo, address, token=token, **options) as client:
        yield client


async def expect_status_7(call, *secrets: Union[str, bytes]) -> SecurityError:
    with pytest.raises(SecurityError) as info:
        await call
    assert info.value.status == Status.SECURITY_EXCEPTION
    for secret in secrets + SECRETS:
        assert not leaks(secret, str(info.value))
    return info.value


def raw_signed_request(seq: int, context: Optional[dict], *, text: str = "raw",
                       caller: str = CLIENT_APPKEY, method: str = "echo") -> bytes:
    header = protocol.request_header("Echo", seq, 2000,
                                     trace=protocol.TraceInfo(clientAppkey=caller),
                                     local_context=context)
    args = Echo.echo_args(text=text) if method == "echo" else getattr(Echo, f"{method}_args")()
    body = codec.encode_message(method, TMessageType.CALL, seq, args)
    return protocol.encode_unified(header, body)


class RecordingProxy:
    """A TCP man-in-the-middle: records what the client sends, optionally rewrites it."""

    def __init__(self, target: str, rewrite: Optional[Callable[[bytes], bytes]] = None) -> None:
        self.target = target
        self.rewrite = rewrite or (lambda data: data)
        self.sent = bytearray()
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: List[asyncio.Task] = []
        self._writers: List[asyncio.StreamWriter] = []
        self.address = ""

    async def __aenter__(self) -> "RecordingProxy":
        self._server = await asyncio.start_server(self._handle, LOCALHOST, 0)
        self.address = f"{LOCALHOST}:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, client_r, client_w) -> None:
        self._writers.append(client_w)   # first: closed on exit even while still connecting on
        host, _, port = self.target.rpartition(":")
        server_r, server_w = await asyncio.open_connection(host, int(port))
        self._writers.append(server_w)

        async def pump(reader, writer, record: bool) -> None:
            with contextlib.suppress(Exception):
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    if record:
                        self.sent += data
                        data = self.rewrite(data)
                    writer.write(data)
                    await writer.drain()
            writer.close()

        self._tasks += [asyncio.ensure_future(pump(client_r, server_w, True)),
                        asyncio.ensure_future(pump(server_r, client_w, False))]


def test_e2e_good_calls_pass():
    async def main():
        auth = server_auth(acl={CLIENT_APPKEY: ["Echo.*"]})
        async with serving(echo_services(), auth=auth) as server, \
                signed_client(server.address) as client:
            assert await client.echo("hello") == "hello"
            assert await client.ping() is None
            results = await asyncio.gather(*(client.echo(f"m{i}") for i in range(200)))
            assert results == [f"m{i}" for i in range(200)]
            assert await client.slow("s", 1) == "s"
            assert sum(auth.rejections.values()) == 0
            stats = server.stats()
            assert stats["Echo.echo"]["calls"] == 201 and stats["Echo.echo"]["errors"] == {}

    run(main())


def test_authenticator_takes_a_plain_mapping_and_refuses_what_is_no_token_store():
    auth = Authenticator({CLIENT_APPKEY: TOKEN})
    check(auth, Signer(CLIENT_APPKEY, TOKEN, SERVER_APPKEY).headers("Echo", "echo"))
    with pytest.raises(TypeError, match="token store"):
        Authenticator([(CLIENT_APPKEY, TOKEN)])


def test_a_token_without_the_server_appkey_it_signs_for_is_refused_at_once():
    with pytest.raises(ValueError, match="remote_appkey"):
        octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=["127.0.0.1:9"], token=TOKEN)


class BrokenTokens:
    """A token store whose backend fails (a KMS outage, a bug)."""

    def token(self, appkey: str) -> Optional[str]:
        raise ConnectionError("the token service is unreachable")


def test_e2e_a_failing_token_store_refuses_the_call_and_keeps_the_connection():
    async def main():
        async with serving(echo_services(), auth=Authenticator(BrokenTokens())) as server, \
                signed_client(server.address) as client:
            for _ in range(2):   # the second call: on the same connection, refused alike
                refused = await expect_status_7(client.echo("x"))
                assert "could not check" in str(refused)
            [endpoint] = client._endpoints.values()
            assert endpoint.connected

    run(main())


def test_e2e_derived_tokens():
    async def main():
        store = DerivedTokens(MASTER)
        async with serving(echo_services(), auth=Authenticator(store)) as server, \
                signed_client(server.address, token=store.token(CLIENT_APPKEY)) as good, \
                signed_client(server.address, token=store.token(OTHER_APPKEY)) as wrong:
            assert await good.echo("kms") == "kms"
            await expect_status_7(wrong.echo("x"), store.token(CLIENT_APPKEY),
                                  store.token(OTHER_APPKEY))

    run(main())


def test_e2e_wrong_token_and_no_token_are_refused():
    async def main():
        auth = server_auth()
        async with serving(echo_services(), auth=auth) as server, \
                signed_client(server.address, token=OTHER_TOKEN) as wrong, \
                signed_client(server.address, token=None) as unsigned, \
                signed_client(server.address) as good:
            error = await expect_status_7(wrong.echo("x"))
            assert "signature" in str(error)
            # the client says what it signed with: the server cannot tell which is wrong
            assert f"signed as {CLIENT_APPKEY!r} for remote_appkey {SERVER_APPKEY!r}" \
                in str(error)
            error = await expect_status_7(unsigned.echo("x"))
            assert "signature" in str(error)
            assert "this client signs nothing: give it token= and remote_appkey=" in str(error)
            await expect_status_7(unsigned.ping())
            # a refusal does not close the connection: the same clients keep getting answers
            await expect_status_7(wrong.echo("again"))
            assert await good.echo("ok") == "ok"
            assert auth.rejections["bad-signature"] == 2
            assert auth.rejections["unsigned"] == 2
            stats = server.stats()
            assert stats["Echo.echo"]["errors"] == {Status.SECURITY_EXCEPTION: 3}
            assert stats["Echo.echo"]["calls"] == 4

    run(main())


def test_e2e_client_signing_for_another_server_appkey_is_refused():
    async def main():
        async with serving(echo_services(), auth=server_auth()) as server, \
                signed_client(server.address, remote_appkey="com.example.not.this.one") as c:
            error = await expect_status_7(c.echo("x"))
            assert "for remote_appkey 'com.example.not.this.one': is that the server's appkey" \
                in str(error)

    run(main())


def test_e2e_replayed_captured_frame_is_refused():
    async def main():
        auth = server_auth()
        async with serving(echo_services(), auth=auth) as server:
            async with RecordingProxy(server.address) as proxy:
                async with signed_client(proxy.address) as client:
                    assert await client.echo("captured") == "captured"
                captured = bytes(proxy.sent)
            assert captured[:2] == b"\xab\xba" and b"captured" in captured
            assert auth.rejections["replayed"] == 0
            # the same bytes again, on a fresh raw connection, from "an attacker"
            async with raw_connection(server.address) as raw:
                await raw.send(captured)
                reply = await raw.read_frame()
                assert reply.header.responseInfo.status == Status.SECURITY_EXCEPTION
                assert "replayed" in reply.header.responseInfo.message
                assert TOKEN not in reply.header.responseInfo.message
                assert not bytes(reply.body)        # refused before the handler: no body
                # and again on the same connection
                await raw.send(captured)
                reply = await raw.read_frame()
                assert reply.header.responseInfo.status == Status.SECURITY_EXCEPTION
            assert auth.rejections["replayed"] == 2
            assert server.stats()["Echo.echo"]["calls"] == 3

    run(main())


def test_e2e_raw_requests_signed_by_the_reference():
    # the server accepts a request signed by Python's hmac and refuses expired ones
    async def main():
        auth = server_auth()
        async with serving(echo_services(), auth=auth) as server, \
                raw_connection(server.address) as raw:
            await raw.send(raw_signed_request(1, signed_context(TOKEN, CLIENT_APPKEY), text="ref"))
            reply = await raw.read_frame()
            assert reply.header.responseInfo.status == 0
            assert decode_body(reply, Echo)[3].success == "ref"
            for seq, offset in ((2, -120.0), (3, 120.0)):
                context = signed_context(TOKEN, CLIENT_APPKEY, ts=now_ms(offset))
                await raw.send(raw_signed_request(seq, context))
                reply = await raw.read_frame()
                assert reply.header.responseInfo.sequenceId == seq
                assert reply.header.responseInfo.status == Status.SECURITY_EXCEPTION
                assert "expired" in reply.header.responseInfo.message
            assert auth.rejections["expired"] == 2

    run(main())


def test_e2e_expired_timestamp_from_a_client_with_a_slow_clock(monkeypatch):
    # the client's clock is two minutes behind: its signature is right, its timestamp is not
    async def main():
        auth = server_auth()
        real_headers = Signer.headers

        def late_headers(self, service, method, body=None):
            headers = real_headers(self, service, method, body)
            ts = str(int(headers[TS_KEY]) - 120_000)
            digest = sha256_hex(body) if self.sign_body and body is not None else None
            headers[TS_KEY] = ts
            headers[SIGN_KEY] = SigningKey(TOKEN).sign(self.appkey, self.server_appkey, service,
                                                       method, ts, headers[NONCE_KEY], digest)
            return headers

        monkeypatch.setattr(Signer, "headers", late_headers)
        async with serving(echo_services(), auth=auth) as server, \
                signed_client(server.address) as client:
            error = await expect_status_7(client.echo("late"))
            assert "expired" in str(error)
            assert auth.rejections["expired"] == 1 and auth.rejections["bad-signature"] == 0

    run(main())


def test_e2e_malformed_huge_timestamp_is_refused_with_status_7():
    # a well-signed request whose timestamp does not fit a float must get status 7,
    # not kill the connection
    async def main():
        auth = server_auth()
        async with serving(echo_services(), auth=auth) as server, \
                raw_connection(server.address) as raw:
            context = signed_context(TOKEN, CLIENT_APPKEY, ts="9" * 400)
            await raw.send(raw_signed_request(1, context))
            reply = await raw.read_frame(timeout=3)
            assert reply.header.responseInfo.status == Status.SECURITY_EXCEPTION
            await raw.send(raw_signed_request(2, signed_context(TOKEN, CLIENT_APPKEY), text="ok"))
            assert decode_body(await raw.read_frame(), Echo)[3].success == "ok"

    run(main())


def test_e2e_ungranted_caller_and_method_are_refused():
    async def main():
        auth = server_auth(acl={CLIENT_APPKEY: ["Echo.echo"]})
        async with serving(echo_services(), auth=auth) as server, \
                signed_client(server.address) as client, \
                signed_client(server.address, token=OTHER_TOKEN, appkey=OTHER_APPKEY) as other:
            assert await client.echo("granted") == "granted"
            error = await expect_status_7(client.ping())
            assert "may not call Echo.ping" in str(error)
            await expect_status_7(other.echo("x"))
            assert auth.rejections["not-granted"] == 2

    run(main())


def test_e2e_a_token_store_that_fails_refuses_that_call_and_no_more(caplog, monkeypatch):
    """A store that raises (a KMS down) refuses the call it was asked for with status
    7, tells the caller nothing of why, and the server goes on; its log names the
    caller as a repr (the name is the peer's: a line break must not forge a line)."""
    monkeypatch.setattr(octo_core.dispatch, "_AUTH_BROKEN",
                        octo_core.dispatch.Throttle(10.0, octo_core.dispatch.log))

    class Flaky(StaticTokens):
        def token(self, appkey: str) -> Optional[str]:
            if appkey.startswith(OTHER_APPKEY):
                raise ConnectionError("the KMS is down")
            return super().token(appkey)

    async def main():
        auth = server_auth(tokens=Flaky({CLIENT_APPKEY: TOKEN, OTHER_APPKEY: OTHER_TOKEN}))
        async with serving(echo_services(), auth=auth) as server, \
                signed_client(server.address) as good, \
                signed_client(server.address, appkey=OTHER_APPKEY + "\nforged",
                              token=OTHER_TOKEN) as broken:
            with caplog.at_level(logging.WARNING, logger="octo_core.server"):
                error = await expect_status_7(broken.echo("x"))
            assert "could not check" in str(error) and "KMS" not in str(error)
            assert await good.echo("still") == "still"
        lines = [r.getMessage() for r in caplog.records if "checking a request" in r.getMessage()]
        assert len(lines) == 1 and "\n" not in lines[0] and "KMS is down" in lines[0]

    run(main())


def test_e2e_only_an_authenticated_caller_learns_which_services_are_not_hosted():
    """Status 8 ("not hosted") to anyone would let an unsigned peer map the port's
    services by name; it gets status 7, as for a hosted one."""
    async def main():
        async with serving(echo_services(), auth=server_auth()) as server:
            async with signed_client(server.address, token=None, service_name="Admin") as anon:
                error = await expect_status_7(anon.echo("x"))
                assert "not hosted" not in str(error)
            async with signed_client(server.address, service_name="Admin") as signed:
                with pytest.raises(ServiceError, match="not hosted"):
                    await signed.echo("x")

    run(main())


def test_e2e_a_denied_peer_is_refused_when_it_connects():
    """A peer on the deny list is let in for nothing: no call, no heartbeat (it
    lists the services and their call rates), no connection slot."""
    async def main():
        auth = server_auth(deny=["127.0.0.0/8"])
        async with serving(echo_services(), auth=auth, max_connections=1) as server:
            async with signed_client(server.address) as client:
                with pytest.raises(TransportError):
                    await client.echo("x")
            async with raw_connection(server.address) as raw:
                await raw.send(protocol.encode_unified(protocol.scanner_heartbeat_request(), b""))
                assert await raw.closed_by_peer()
            assert auth.rejections["ip-denied"] >= 2
            assert auth.rejections["bad-signature"] == 0 and not server._connections

    run(main())


def test_e2e_a_peer_off_the_allow_list_may_not_call_but_gets_heartbeats():
    """The allow list says who may call; OCTO's scanner, wherever it runs, still
    gets its heartbeat answered (refusing it would have the node marked DEAD)."""
    async def main():
        auth = server_auth(allow=["10.0.0.0/8"])
        async with serving(echo_services(), auth=auth) as server:
            async with signed_client(server.address) as client:
                error = await expect_status_7(client.echo("x"))
                assert "127.0.0.1" in str(error) and "allow list" in str(error)
            async with raw_connection(server.address) as raw:
                await raw.send(protocol.encode_unified(protocol.scanner_heartbeat_request(), b""))
                assert (await raw.read_frame()).header.responseInfo.status == 0
            assert auth.rejections["ip-denied"] == 1

    run(main())


def test_e2e_a_heartbeat_does_not_name_the_hosted_methods_when_auth_is_on():
    """Heartbeats cannot be signed, and the plan says an unauthenticated peer learns
    nothing, not even which services are hosted: with ``auth`` the heartbeat's
    load info leaves out the per-method rates (``methodQpsMap``) it has without."""
    async def heartbeat_load(server: octo_core.Server) -> Any:
        async with raw_connection(server.address) as raw:
            await raw.send(protocol.encode_unified(protocol.scanner_heartbeat_request(), b""))
            return (await raw.read_frame()).header.heartbeatInfo.loadInfo

    async def main():
        async with serving(echo_services(), auth=server_auth()) as server:
            async with signed_client(server.address) as client:
                assert await client.echo("x") == "x"
            load = await heartbeat_load(server)
            assert load.methodQpsMap is None and load.threadNum > 0
        async with serving(echo_services()) as server:
            async with async_client(Echo, server.address) as client:
                assert await client.echo("x") == "x"
            assert "Echo.echo" in (await heartbeat_load(server)).methodQpsMap

    run(main())


def test_e2e_a_replay_costs_its_caller_no_quota():
    """A replayed request is refused before the quota is asked: whoever captured
    one request must not be able to use up its caller's quota with it."""
    async def main():
        async with serving(echo_services(), auth=server_auth(),
                           quotas={CLIENT_APPKEY: 2}) as server, \
                raw_connection(server.address) as raw:
            signer = Signer(CLIENT_APPKEY, TOKEN, SERVER_APPKEY)
            captured = signer.headers("Echo", "echo")
            statuses = []
            for seq in range(5):    # the original, then four replays of it
                await raw.send(raw_signed_request(seq, captured))
                statuses.append((await raw.read_frame()).header.responseInfo.status)
            await raw.send(raw_signed_request(9, signer.headers("Echo", "echo")))  # its next call
            statuses.append((await raw.read_frame()).header.responseInfo.status)
            assert statuses == [0, 7, 7, 7, 7, 0]

    run(main())


def test_e2e_native_thrift_is_refused_when_auth_is_required():
    async def main():
        handler = EchoHandler()
        async with serving(echo_services(handler), auth=server_auth()) as server:
            async with async_client(Echo, server.address, protocol="thrift", token=TOKEN,
                                    remote_appkey=SERVER_APPKEY) as native:
                with pytest.raises(OctoError) as info:
                    await native.echo("x")
                assert "authentication" in str(info.value)
                with pytest.raises(OctoError):
                    await native.ping()
            assert handler.pings == 0
            errors = server.stats()["Echo.echo"]["errors"]
            assert errors == {Status.SECURITY_EXCEPTION: 1}

    run(main())


def test_e2e_plain_thriftpy2_client_is_refused_when_auth_is_required():
    async def main():
        async with serving(echo_services(), auth=server_auth()) as server:
            def call() -> None:
                with thriftpy2_client(Echo, LOCALHOST, server.port) as client:
                    with pytest.raises(TApplicationException) as info:
                        client.echo("x")
                    assert "authentication" in str(info.value.message)
            await asyncio.get_running_loop().run_in_executor(None, call)

    run(main())


def test_e2e_sign_body_on_both_sides_works():
    async def main():
        auth = server_auth(sign_body=True)
        async with serving(echo_services(), auth=auth) as server, \
                signed_client(server.address, sign_body=True) as client, \
                signed_client(server.address, sign_body=True, checksum=True,
                              compression="gzip") as gz:
            assert await client.echo("body signed") == "body signed"
            assert await client.ping() is None
            assert await gz.echo("gzip" * 100) == "gzip" * 100
            assert sum(auth.rejections.values()) == 0

    run(main())


def test_e2e_sign_body_mismatch_is_refused():
    async def main():
        async with serving(echo_services(), auth=server_auth(sign_body=True)) as server, \
                signed_client(server.address, sign_body=False) as client:
            await expect_status_7(client.echo("x"))
        async with serving(echo_services(), auth=server_auth(sign_body=False)) as server, \
                signed_client(server.address, sign_body=True) as client:
            await expect_status_7(client.echo("x"))

    run(main())


def test_e2e_body_tampered_in_flight_is_refused():
    def tamper(data: bytes) -> bytes:
        return data.replace(b"hello", b"jello")

    async def main():
        # body signing on: the man in the middle is caught
        auth = server_auth(sign_body=True)
        async with serving(echo_services(), auth=auth) as server, \
                RecordingProxy(server.address, tamper) as proxy, \
                signed_client(proxy.address, sign_body=True) as client:
            assert await client.echo("untouched") == "untouched"
            error = await expect_status_7(client.echo("hello"))
            assert "signature" in str(error)
            assert auth.rejections["bad-signature"] == 1
        # control: without body signing the same tampering goes through unnoticed
        async with serving(echo_services(), auth=server_auth()) as server, \
                RecordingProxy(server.address, tamper) as proxy, \
                signed_client(proxy.address) as client:
            assert await client.echo("hello") == "jello"

    run(main())


def test_e2e_tampered_header_field_is_refused():
    # changing the method or the caller named in a captured frame breaks the signature
    async def main():
        auth = server_auth()
        async with serving(echo_services(), auth=auth) as server, \
                raw_connection(server.address) as raw:
            context = signed_context(TOKEN, CLIENT_APPKEY, method="echo")
            await raw.send(raw_signed_request(1, context, method="ping"))
            reply = await raw.read_frame()
            assert reply.header.responseInfo.status == Status.SECURITY_EXCEPTION
            context = signed_context(TOKEN, CLIENT_APPKEY)
            await raw.send(raw_signed_request(2, context, caller=OTHER_APPKEY))
            reply = await raw.read_frame()
            assert reply.header.responseInfo.status == Status.SECURITY_EXCEPTION
            assert auth.rejections["bad-signature"] == 2

    run(main())


def test_forgeries_from_invented_callers_do_not_grow_the_key_cache():
    # With derived tokens every appkey has a token; a forged request per invented
    # appkey must not leave a cached key behind (unbounded memory from hostile input).
    auth = Authenticator(DerivedTokens("master"))
    now = time.time()
    for i in range(500):
        with pytest.raises(SecurityError):
            auth.check(caller=f"invented.{i}", server_appkey="srv", service="Echo",
                       method="echo", local_context={TS_KEY: str(int(now * 1000)),
                                                     NONCE_KEY: f"{i:032x}", SIGN_KEY: "0" * 64},
                       now=now)
    assert auth.rejections["bad-signature"] == 500
    assert len(auth._keys) == 0
    good = Signer("real.caller", DerivedTokens("master").token("real.caller"), "srv")
    auth.check(caller="real.caller", server_appkey="srv", service="Echo", method="echo",
               local_context=good.headers("Echo", "echo"))
    assert len(auth._keys) == 1


def test_the_key_cache_keeps_its_size_as_tokens_rotate(monkeypatch):
    monkeypatch.setattr(octo_core.auth, "_SIGNING_KEYS_KEPT", 3)
    auth = Authenticator(DerivedTokens("master"))
    for i in range(5):   # five callers (or one caller's token rotated five times)
        caller = f"caller.{i}"
        signer = Signer(caller, DerivedTokens("master").token(caller), "srv")
        auth.check(caller=caller, server_appkey="srv", service="Echo", method="echo",
                   local_context=signer.headers("Echo", "echo"))
    assert len(auth._keys) == 3   # the newest three: the first two went
    assert set(auth._keys) == {DerivedTokens("master").token(f"caller.{i}") for i in (2, 3, 4)}


def test_nonces_leave_the_cache_when_they_expire_whatever_order_they_came_in():
    """One request from a client whose clock runs ahead (within the skew) must not
    hold every later nonce in the cache past its own expiry."""
    auth = make_auth(nonce_capacity=10, skew=5.0)
    t0 = time.time()
    check(auth, signed_context(TOKEN, CLIENT_APPKEY, ts=str(int((t0 + 4) * 1000))), now=t0)
    for _ in range(9):
        check(auth, signed_context(TOKEN, CLIENT_APPKEY, ts=str(int(t0 * 1000))), now=t0)
    later = t0 + 6        # the nine expired at t0 + 5; the one ahead lives to t0 + 9
    check(auth, signed_context(TOKEN, CLIENT_APPKEY, ts=str(int(later * 1000))), now=later)
    assert len(auth._nonces._seen) == 2


@pytest.mark.parametrize("options", [dict(acl={CLIENT_APPKEY: "Echo.*"}), dict(allow="10.0.0.0/8"),
                                     dict(deny="10.0.0.1")])
def test_a_pattern_list_given_as_one_string_is_refused(options):
    # read as its characters, the grant "Echo.*" held the pattern "*": every method of every service
    with pytest.raises(TypeError, match="not one string"):
        make_auth(**options)


def test_an_empty_token_signs_nothing_and_passes_nothing():
    # the HMAC under the empty key is anyone's to make: an empty token (a blank
    # line in a config, an unset variable) must not let forgeries in
    for tokens in ({CLIENT_APPKEY: ""}, {CLIENT_APPKEY: b""}):
        auth = make_auth(tokens=tokens)
        with pytest.raises(SecurityError, match="bad-signature"):
            check(auth, signed_context(b"", CLIENT_APPKEY))
        assert auth.rejections == {"unknown-caller": 1}
    for empty in ("", b""):
        with pytest.raises(ValueError, match="empty"):
            DerivedTokens(empty)
        with pytest.raises(ValueError, match="empty"):
            Signer(CLIENT_APPKEY, empty, SERVER_APPKEY)


@pytest.mark.parametrize("skew", [float("nan"), float("inf"), 0, -1.0])
def test_a_skew_that_bounds_nothing_is_refused(skew):
    # with NaN every age compared "within the window": a ten-year-old request passed
    with pytest.raises(ValueError, match="skew"):
        make_auth(skew=skew)


def test_a_nonce_cache_that_holds_nothing_is_refused():
    with pytest.raises(ValueError, match="nonce_capacity"):
        make_auth(nonce_capacity=0)
