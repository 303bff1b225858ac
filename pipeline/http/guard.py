"""Wrong tokens per peer address: a guesser gets a few tries a minute, not thousands a second.

Each address (an IPv6 one by its /64, what one host or home is given) has an allowance of ATTEMPTS wrong
tokens, given back at ATTEMPTS per WINDOW. Without any left it is refused (429) before its token is looked
at, so a right guess then tells it nothing. Right tokens and requests with no token cost nothing. At most
MAX_PEERS addresses are remembered; a peer whose allowance is whole again is forgotten, and while all are
in use every further address shares one allowance: memory is bounded, and so are the guesses of a peer
with many addresses.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger("pipeline.http")

ATTEMPTS = 10  # wrong tokens an address may send in a row
WINDOW = 60.0  # seconds in which the whole allowance comes back
MAX_PEERS = 4096  # addresses remembered at once
_OTHERS = "(other addresses)"
WARN_EVERY = 60.0  # seconds between warnings about refused guesses


def peer_key(address: str | None) -> str:
    """The address an allowance belongs to: IPv4 as it is, IPv6 by its /64 (IPv4-mapped ones as IPv4)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or ""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class SignInGuard:
    """`retry_after(peer)` before looking at a token, `failed(peer)` when it was wrong (or before: a sign-in
    form takes a while to arrive, and guesses sent meanwhile must not all pass), `forgive(peer)` when right."""

    def __init__(self, attempts: int = ATTEMPTS, window: float = WINDOW, max_peers: int = MAX_PEERS,
                 clock: Callable[[], float] = time.monotonic, who: str = "operator endpoint") -> None:
        self.attempts, self.window, self.max_peers, self.clock = attempts, window, max_peers, clock
        self.who = who
        self.rate = attempts / window
        self._used: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tries used, at), oldest first
        self._refused = 0
        self._warned = -math.inf

    def retry_after(self, address: str | None) -> int:
        """0 when `address` may try a token now, else the whole seconds until it may (a refusal)."""
        now = self.clock()
        key = self._key(address, now)
        over = self._level(key, now) + 1 - self.attempts
        if over <= 0:
            return 0
        self._refused += 1
        if now - self._warned >= WARN_EVERY:
            log.warning("%s: too many wrong tokens (latest from %s): %d request(s) refused with 429 since the "
                        "last such line; an address may send %d wrong tokens a minute", self.who, key,
                        self._refused, self.attempts * 60 / self.window)
            self._warned, self._refused = now, 0
        return max(1, math.ceil(over / self.rate))

    def failed(self, address: str | None) -> None:
        self._add(address, 1.0)

    def forgive(self, address: str | None) -> None:
        self._add(address, -1.0)

    def _add(self, address: str | None, tries: float) -> None:
        now = self.clock()
        key = self._key(address, now)
        self._used[key] = (min(self.attempts, max(0.0, self._level(key, now) + tries)), now)
        self._used.move_to_end(key)

    def _level(self, key: str, now: float) -> float:
        used, at = self._used.get(key, (0.0, now))
        return max(0.0, used - (now - at) * self.rate)

    def _key(self, address: str | None, now: float) -> str:
        key = peer_key(address)
        if key in self._used:
            return key
        while self._used:  # forget the addresses whose allowance is whole again (oldest try first)
            first, (_, at) = next(iter(self._used.items()))
            if now - at < self.window:
                break
            del self._used[first]
        return key if len(self._used) < self.max_peers else _OTHERS

    def __len__(self) -> int:
        return len(self._used)
