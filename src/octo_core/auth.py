"""Signed requests and access control (PROTOCOL.md §6).

Clients sign with their appkey's token (``Signer``); servers check a request in
the order of OCTO's SecurityFilter — restrict (peer IP), authenticate
(signature, clock skew), authorise (ACL), and only then keep its nonce against
replays, so that a caller granted nothing cannot fill the nonce cache — and
refuse with status 7 and a reason that never contains a secret
(``Authenticator``). A server refuses a peer on the deny list when it connects.

Tokens: a static ``{appkey: token}`` store, a file of the same, or the derived
("KMS") store where ``token(appkey) = HMAC-SHA256(master_secret, appkey)``, the
32 bytes themselves. The HMAC key of a signature is the token: its UTF-8 bytes
when it is text, the bytes as they are otherwise.
"""
from __future__ import annotations

import collections
import fnmatch
import heapq
import ipaddress
import itertools
import json
import math
import os
import threading
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from octo_core._codec import SigningKey, sha256_hex
from octo_core.checks import finite_number
from octo_core.errors import SecurityError

TS_KEY = "octo-auth-ts"
NONCE_KEY = "octo-auth-nonce"
SIGN_KEY = "octo-auth-sign"
#: Signing keys an Authenticator keeps ready (one per token that has signed a
#: good request): every caller of a large fleet, and rotated tokens, fit, yet
#: tokens rotated for ever do not grow it without bound.
_SIGNING_KEYS_KEPT = 16384


# --- token stores ---------------------------------------------------------------------

def _secret(what: str, secret: Union[str, bytes]) -> Union[str, bytes]:
    """``secret``, unless it is empty: an HMAC under the empty key anyone can make."""
    if not secret:
        raise ValueError(f"{what} is empty: anyone could sign with it")
    return secret


class StaticTokens:
    """Tokens given explicitly: ``{appkey: token}``, each text (or bytes). An
    appkey whose token is empty (or None) has none (its requests are refused).
    ``TypeError`` for any other value: it would fail each of that caller's calls
    when checked."""

    def __init__(self, tokens: Mapping[str, Union[str, bytes, None]]) -> None:
        unfit = sorted(repr(appkey) for appkey, token in tokens.items()
                       if token is not None and not isinstance(token, (str, bytes)))
        if unfit:   # (the appkeys, never the values: they are secrets)
            raise TypeError(f"a token is text or bytes: not those of {', '.join(unfit)}")
        self._tokens = dict(tokens)

    def token(self, appkey: str) -> Optional[Union[str, bytes]]:
        """``appkey``'s token; None (or empty) when it has none."""
        return self._tokens.get(appkey)

    @classmethod
    def from_file(cls, path: str) -> "StaticTokens":
        """A JSON object ``{appkey: token}``, or lines ``appkey token`` (a ``#`` that
        starts a word starts a comment; one inside a token is part of it)."""
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if text.lstrip().startswith("{"):
            try:
                loaded = json.loads(text)
            except ValueError as exc:   # (a JSON error names no file, and quotes none of it)
                raise ValueError(f"{path}: not JSON: {exc}") from None
            try:
                return cls(loaded)
            except TypeError as exc:
                raise TypeError(f"{path}: {exc}") from None
        tokens = {}
        for number, line in enumerate(text.splitlines(), 1):
            parts = list(itertools.takewhile(lambda word: not word.startswith("#"), line.split()))
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{path}:{number}: expected 'appkey token'")
            tokens[parts[0]] = parts[1]
        return cls(tokens)


class DerivedTokens:
    """KMS-style tokens: ``HMAC-SHA256(master_secret, appkey)`` (32 bytes) for any appkey."""

    def __init__(self, master_secret: Union[str, bytes]) -> None:
        self._master = SigningKey(_secret("the master secret", master_secret))

    def token(self, appkey: str) -> Optional[bytes]:
        """``appkey``'s token, derived from the master secret (every appkey has one)."""
        return self._master.digest(appkey.encode())


TokenStore = Union[StaticTokens, DerivedTokens]


# --- client side ----------------------------------------------------------------------

class Signer:
    """Adds the §6 entries to a request's ``localContext``."""

    def __init__(self, appkey: str, token: Union[str, bytes], server_appkey: str, *,
                 sign_body: bool = False) -> None:
        self.appkey = appkey
        self.server_appkey = server_appkey
        self.sign_body = sign_body
        self._key = SigningKey(_secret("the token", token))

    def headers(self, service: str, method: str, body: Optional[bytes] = None) -> Dict[str, str]:
        """The ``localContext`` entries that sign one call of ``service.method``
        (timestamp, fresh nonce, signature; ``body`` is signed too with ``sign_body``)."""
        ts = str(int(time.time() * 1000))
        nonce = os.urandom(16).hex()
        digest = sha256_hex(body) if self.sign_body and body is not None else None
        signature = self._key.sign(self.appkey, self.server_appkey, service, method, ts, nonce, digest)
        return {TS_KEY: ts, NONCE_KEY: nonce, SIGN_KEY: signature}


# --- server side ----------------------------------------------------------------------

class _NonceCache:
    """Nonces whose requests could still pass the skew check, at most ``capacity``.

    A request signed at ``ts`` is accepted until ``ts + skew``; its nonce is kept
    that long. Full, the cache forgets its oldest nonce to take a newer one, and
    from then on refuses every request signed as early as the one forgotten (the
    ``floor``): the window a replay could use narrows, no replay gets through,
    and no caller, however many requests it sends, locks fresh ones out.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: Dict[str, float] = {}                 # nonce -> when it expires
        self._expiries: List[Tuple[float, str]] = []      # a heap of (expires, nonce)
        self._floor = -math.inf     # the latest expiry forgotten early: none at or before it passes
        self._lock = threading.Lock()

    def first_use(self, nonce: str, now: float, expires: float) -> Optional[str]:
        """None if ``nonce`` is new (kept until ``expires``), else why it is refused."""
        with self._lock:
            seen, expiries = self._seen, self._expiries
            while expiries and expiries[0][0] < now:
                del seen[heapq.heappop(expiries)[1]]
            if nonce in seen:
                return "replayed"
            if expires <= self._floor:
                return "nonce-cache-full"
            if len(seen) >= self.capacity:
                oldest = expiries[0][0]
                if expires <= oldest:      # it would be the one to forget
                    return "nonce-cache-full"
                del seen[heapq.heappop(expiries)[1]]
                self._floor = oldest
            seen[nonce] = expires
            heapq.heappush(expiries, (expires, nonce))
            return None


IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _network(rule: str) -> Union[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    """An allow/deny rule; an IPv4-mapped one (``::ffff:10.0.0.0/104``) as the IPv4
    network it names, since peers are compared as IPv4 (a deny rule written the
    mapped way never matched: it failed open)."""
    net = ipaddress.ip_network(rule, strict=False)
    mapped = getattr(net.network_address, "ipv4_mapped", None)
    if mapped is not None and net.prefixlen >= 96:
        return ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}", strict=False)
    return net


def _rules(what: str, rules: Iterable[str]) -> Tuple[str, ...]:
    """A list of patterns; one string is refused, not read as its characters (the
    grant "Echo.*" would have become "E", "c", ..., "*": every method)."""
    if isinstance(rules, (str, bytes)):
        raise TypeError(f"{what} is a list of patterns, not one string: [{rules!r}]")
    return tuple(rules)


class Authenticator:
    """The server's security filter.

    ``tokens``: a token store (``StaticTokens``, ``DerivedTokens``, or anything with
    ``token(appkey)`` giving text, bytes or None), or a plain ``{appkey: token}`` mapping;
    ``token`` is called on the server's loop for every call, so it answers from
    memory (a store backed by a KMS keeps a cache, refreshed off the loop).
    ``allow``/``deny``: peer IPs or CIDRs (deny wins; with an allow list, only it
    passes). ``acl``: ``{caller appkey pattern: ["Service.method" patterns]}``
    with ``fnmatch`` wildcards (``Service`` is the name the call names, the one
    ``add_service`` was given: the IDL service's unless ``name=`` set another);
    ``None`` lets every authenticated caller in.
    ``skew``: accepted clock difference in seconds. ``sign_body``: the signature
    must cover the body's SHA-256. ``rejections`` counts refusals by reason.

    Replay protection keeps each nonce until its timestamp leaves the skew
    window; ``nonce_capacity`` bounds that memory (about 300 bytes a nonce).
    Past it the oldest nonce is forgotten for a new one, and requests signed no
    later than the one forgotten are refused ("nonce-cache-full"): beyond
    ``nonce_capacity / skew`` (with the defaults, about 16,000) signed calls a
    second the window narrows to the last ``nonce_capacity`` calls, so callers
    whose clocks lag the server's by more than that are refused first.
    """

    def __init__(self, tokens: Union[TokenStore, Mapping[str, Union[str, bytes, None]]], *,
                 acl: Optional[Mapping[str, Iterable[str]]] = None,
                 allow: Sequence[str] = (), deny: Sequence[str] = (), skew: float = 60.0,
                 sign_body: bool = False, nonce_capacity: int = 1_000_000) -> None:
        if isinstance(tokens, Mapping):
            tokens = StaticTokens(tokens)
        elif not callable(getattr(tokens, "token", None)):
            raise TypeError(f"tokens is a token store (with token(appkey)) or a mapping "
                            f"{{appkey: token}}, not {type(tokens).__name__}")
        # NaN compares false (it would let any old request in); infinity would keep
        # every nonce for ever
        finite_number("skew", skew)
        if nonce_capacity < 1:
            raise ValueError(f"nonce_capacity is at least 1, not {nonce_capacity!r}")
        self.tokens = tokens
        self.acl = None if acl is None else {k: _rules(f"acl[{k!r}]", v) for k, v in acl.items()}
        self.allow = [_network(a) for a in _rules("allow", allow)]
        self.deny = [_network(d) for d in _rules("deny", deny)]
        self.skew = skew
        self.sign_body = sign_body
        self._nonces = _NonceCache(nonce_capacity)
        self._keys: Dict[Union[str, bytes], SigningKey] = {}   # by token
        self.rejections: Dict[str, int] = collections.Counter()

    def _refuse(self, reason: str, detail: str, told: Optional[str] = None) -> SecurityError:
        """Count ``reason``; the error the peer gets says ``told`` if given."""
        self.rejections[reason] += 1
        return SecurityError(told or f"{reason}: {detail}")

    def check_peer(self, ip: Optional[str]) -> None:
        """Restrict: refuse a peer on the deny list or off the allow list (a call)."""
        address = self._check_denied(ip)
        if self.allow and not (address is not None and any(address in net for net in self.allow)):
            raise self._refuse("ip-denied", f"{address or 'a peer with no IP address'} "
                                            "is not on the allow list")

    def check_connection(self, ip: Optional[str]) -> None:
        """Refuse a peer on the deny list when it connects: nothing is answered to
        it, not even a heartbeat. (The allow list says who may call: a peer off it
        is answered heartbeats, as OCTO's scanner needs, and refused every call.)"""
        self._check_denied(ip)

    def _check_denied(self, ip: Optional[str]) -> Optional[IPAddress]:
        """The peer's address as the rules see it (None without one); refused if denied."""
        if not self.deny and not self.allow:
            return None
        try:
            address = ipaddress.ip_address(ip or "")
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped   # ::ffff:10.0.0.1 is 10.0.0.1 to the rules
        if any(address in net for net in self.deny):
            raise self._refuse("ip-denied", f"{address} is on the deny list")
        return address

    def check(self, *, caller: Optional[str], server_appkey: str, service: str, method: str,
              local_context: Optional[Mapping[str, str]], body: Optional[bytes] = None,
              now: Optional[float] = None) -> None:
        """Authenticate and authorise one request; raises ``SecurityError`` (status 7).

        The nonce is kept last: a request the signature, clock or ACL refuses
        takes no room in the nonce cache (a caller granted nothing could fill
        it and lock everyone out), and any request that gets past them is kept,
        whatever the server then decides (a quota refusal, say), so it cannot
        be replayed later, and a replay is refused before it costs a quota."""
        context = local_context or {}
        ts, nonce, signature = context.get(TS_KEY), context.get(NONCE_KEY), context.get(SIGN_KEY)
        if not caller or not ts or not nonce or not signature:
            raise self._refuse("unsigned", "the request carries no signature")
        token = self.tokens.token(caller)
        if not token:   # told as a bad signature: which appkeys have tokens is no one's business
            raise self._refuse("unknown-caller", f"no token for appkey {caller!r}",
                               told="bad-signature: the signature does not match")
        key = self._keys.get(token)
        cached = key is not None
        if key is None:
            key = SigningKey(token)
        digest = None
        if self.sign_body:
            if body is None:   # the server always passes it: this is a caller's slip
                raise TypeError("check(): this Authenticator signs bodies (sign_body=True); "
                                "pass the request's body")
            digest = sha256_hex(body)
        if not key.verify(signature, caller, server_appkey, service, method, ts, nonce, digest):
            raise self._refuse("bad-signature", "the signature does not match")
        if not cached:
            # only callers that proved they hold the token: with derived tokens every
            # invented appkey has one, and forgeries must not grow this cache; nor do
            # rotated tokens, past its size (the oldest key goes first)
            if len(self._keys) >= _SIGNING_KEYS_KEPT:
                del self._keys[next(iter(self._keys))]
            self._keys[token] = key
        now = time.time() if now is None else now
        if not (ts.isascii() and ts.isdigit() and len(ts) <= 16):
            raise self._refuse("bad-timestamp", "the timestamp is not a number of milliseconds")
        if len(nonce) != 32 or nonce.strip("0123456789abcdef"):
            raise self._refuse("bad-nonce", "the nonce is not 16 bytes in lowercase hex")
        sent = int(ts) / 1000.0
        if abs(now - sent) > self.skew:
            raise self._refuse("expired", f"timestamp is {now - sent:+.0f}s off (allowed ±{self.skew:.0f}s)")
        if self.acl is not None and not self._granted(caller, f"{service}.{method}"):
            raise self._refuse("not-granted", f"{caller} may not call {service}.{method}")
        refused = self._nonces.first_use(f"{caller}/{nonce}", now, sent + self.skew)
        if refused == "replayed":
            raise self._refuse(refused, "this nonce was already used")
        if refused is not None:
            raise self._refuse(refused, f"signed earlier than the {self._nonces.capacity} "
                                        "nonces the server remembers: sign it anew")

    def _granted(self, caller: str, target: str) -> bool:
        for who, grants in self.acl.items():  # type: ignore[union-attr]  # asked only with one
            if fnmatch.fnmatchcase(caller, who) and any(fnmatch.fnmatchcase(target, g) for g in grants):
                return True
        return False
