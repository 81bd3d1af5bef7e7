"""The studio's HTTP doors: one pure-ASGI middleware in front of Gradio's routes.

- Host check: a DNS-rebinding page reaches a studio on 127.0.0.1 under a name the attacker controls, so only the
  names the studio is served under pass (loopback, the bound address, the --share link, --allowed-hosts).
- Origin check: a browser names the page behind a cross-site request in ``Origin``; only the studio's own pages pass.
  Requests without Origin (curl, gradio_client) rely on the Host check alone.
- Login throttle: failed ``POST /login`` attempts are slowed per client address, so passwords cannot be guessed fast.
  An attempt during the wait is held until the wait is over (one at a time per address; others are refused with
  429), because Gradio's login page shows only a 400 ("incorrect credentials") or a 200: a person who mistyped gets
  a slower answer, never a silent one.

Use it through ``guard_middleware(...)`` (a ``starlette.middleware.Middleware`` for FastAPI's ``middleware=``).
No gradio, no torch.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import math
import socket
import time
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from starlette.middleware import Middleware

WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
LOOPBACK_NAMES = {"localhost"}
LOGIN_PATHS = {"/login", "/login/"}


def host_of(authority: str) -> str:
    """'Name:7860' -> 'name', '[::1]:7860' -> '::1'; lower case, no trailing dot (the port is ignored)."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    if authority.count(":") == 1:
        authority = authority.partition(":")[0]
    return authority.rstrip(".")


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip   # ::ffff:127.0.0.1 is 127.0.0.1


@dataclasses.dataclass
class HostPolicy:
    """Which host names the studio answers to. ``share_url`` is called per request: the link exists only after
    launch."""

    bound_host: str = "127.0.0.1"
    allowed_hosts: Iterable[str] = ()
    share_url: Callable[[], str | None] | None = None

    def __post_init__(self):
        self.wildcard = self.bound_host in WILDCARD_HOSTS
        names = set(LOOPBACK_NAMES) | {host_of(h) for h in self.allowed_hosts if h.strip()}
        if not self.wildcard:
            names.add(host_of(self.bound_host))
        else:  # LAN visitors may use this machine's name
            hostname = socket.gethostname().lower()
            names |= {hostname, f"{hostname}.local"}
        self.names = names

    def share_host(self) -> str | None:
        url = self.share_url() if self.share_url else None
        return (urlsplit(url).hostname or None) if url else None

    def is_named(self, host: str) -> bool:
        """A name or address listed for the studio (loopback included); not just any IP."""
        ip = ip_of(host)
        if ip is not None and ip.is_loopback:
            return True
        return host in self.names or (host != "" and host == self.share_host())

    def allows_host(self, host: str) -> bool:
        # A rebinding page can only use a name, never the IP it connected to, so on a wildcard bind any IP passes.
        return self.is_named(host) or (self.wildcard and ip_of(host) is not None)

    def allows_origin(self, origin: str, request_host: str) -> bool:
        """Same host as the request, or a listed name; never a foreign IP (an attacker's own site can be one)."""
        if origin == "null":
            return False
        host = host_of(urlsplit(origin).netloc.rpartition("@")[2])
        return host != "" and (host == request_host or self.is_named(host))


@dataclasses.dataclass
class LoginThrottle:
    """Failed logins per client address: after ``free_failures`` in a row, wait ``first_wait`` s, doubling up to
    ``max_wait`` s, since the last failure. Each attempt counts as a failure until it succeeds, so parallel attempts
    do not slip past; one attempt per address may wait its turn (``hold``). At most ``max_clients`` addresses are
    remembered, none longer than ``forget_after`` s. ``sleep`` and ``clock`` are injectable for tests."""

    free_failures: int = 3
    first_wait: float = 2.0
    max_wait: float = 60.0
    failure_delay: float = 1.0
    max_clients: int = 4096
    forget_after: float = 3600.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Any] = asyncio.sleep

    def __post_init__(self):
        self.failures: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()
        self.holding: set[str] = set()

    def hold(self, client: str) -> bool:
        """Let one attempt of ``client`` wait for its turn; False when one is waiting already."""
        if client in self.holding or len(self.holding) >= self.max_clients:
            return False
        self.holding.add(client)
        return True

    def release(self, client: str) -> None:
        self.holding.discard(client)

    def _entry(self, client: str) -> tuple[int, float]:
        count, last = self.failures.get(client, (0, 0.0))
        if count and self.clock() - last > self.forget_after:
            self.failures.pop(client, None)
            return 0, 0.0
        return count, last

    def wait_left(self, client: str) -> float:
        """Seconds this client must still wait before its next attempt (0: it may try now)."""
        count, last = self._entry(client)
        if count < self.free_failures:
            return 0.0
        doublings = min(count - self.free_failures, 32)   # bounded: a float of 2**1100 overflows
        wait = min(self.max_wait, self.first_wait * 2 ** doublings)
        return max(0.0, last + wait - self.clock())

    def attempt(self, client: str) -> None:
        """Counts an attempt as a failure until it succeeds, so parallel guesses cannot slip past."""
        count, _ = self._entry(client)
        self.failures[client] = (count + 1, self.clock())
        self.failures.move_to_end(client)
        while len(self.failures) > self.max_clients:
            self.failures.popitem(last=False)

    def failure_answered(self, client: str) -> None:
        """The wait runs from the moment the failure was answered."""
        if client in self.failures:
            self.failures[client] = (self.failures[client][0], self.clock())

    def succeeded(self, client: str) -> None:
        """The attempt succeeded: the client starts afresh."""
        self.failures.pop(client, None)


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class HostGuard:
    """Pure ASGI middleware: refuses foreign Host and Origin headers, throttles failed logins. Only ``http`` and
    ``websocket`` scopes are checked."""

    def __init__(self, app: Any, policy: HostPolicy | None = None, throttle: LoginThrottle | None = None):
        self.app = app
        self.policy = policy or HostPolicy()
        self.throttle = throttle or LoginThrottle()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal:
            return await self.refuse(scope, send, *refusal)
        if scope["type"] == "http" and scope.get("method") == "POST" and self.login_path(scope):
            return await self.login(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, scope: dict) -> tuple[int, str] | None:
        """(status, message) when the Host or Origin is not the studio's, else None."""
        host = host_of(_header(scope, b"host") or "")
        if not self.policy.allows_host(host):
            shown = host[:100] or "(none)"
            return 421, (f"FLUX Studio does not answer to the host name {shown!r} (a web page may be trying to reach "
                         f"it under a name it controls). If you use this name on purpose, start the studio with "
                         f"--allowed-hosts {shown}.")
        origin = _header(scope, b"origin")
        if origin is not None and not self.policy.allows_origin(origin.strip().lower(), host):
            return 403, (f"FLUX Studio refuses requests from pages of another site (Origin {origin[:100]!r}). Open "
                         f"the studio at its own address; to serve it under another name, start it with "
                         f"--allowed-hosts NAME.")
        return None

    @staticmethod
    def login_path(scope: dict) -> bool:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return path in LOGIN_PATHS

    async def login(self, scope: dict, receive: Callable, send: Callable) -> None:
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.throttle.wait_left(client)
        if wait > 0:
            if not self.throttle.hold(client):
                seconds = math.ceil(wait)
                message = (f"Too many failed logins from {client}, and another attempt is already waiting its turn. "
                           f"Wait {seconds} s before trying again.")
                return await self.refuse(scope, send, 429, message, {"retry-after": str(seconds)})
            try:
                while (wait := self.throttle.wait_left(client)) > 0:   # an answer meanwhile may lengthen it
                    await self.throttle.sleep(wait)
            finally:
                self.throttle.release(client)
        self.throttle.attempt(client)

        async def send_slowly(message: dict) -> None:
            if message["type"] == "http.response.start":
                if 200 <= message["status"] < 300:
                    self.throttle.succeeded(client)
                else:  # a wrong password (already counted): slow the answer without holding the event loop
                    await self.throttle.sleep(self.throttle.failure_delay)
                    self.throttle.failure_answered(client)
            await send(message)

        await self.app(scope, receive, send_slowly)

    @staticmethod
    async def refuse(scope: dict, send: Callable, status: int, message: str, headers: dict | None = None) -> None:
        if scope["type"] == "websocket":   # closing before accept answers the handshake with 403
            return await send({"type": "websocket.close", "code": 1008, "reason": message.encode()[:120].decode(errors="ignore")})
        body = (message + "\n").encode()
        raw = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
               (b"x-content-type-options", b"nosniff")]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


def guard_middleware(bound_host: str | None = "127.0.0.1", allowed_hosts: Iterable[str] = (),
                     share_url: Callable[[], str | None] | None = None,
                     throttle: LoginThrottle | None = None) -> Middleware:
    """The guard for FastAPI's ``middleware=`` (Gradio: ``launch(app_kwargs={"middleware": [...]})``)."""
    bound_host = "127.0.0.1" if bound_host is None else bound_host
    policy = HostPolicy(bound_host=bound_host, allowed_hosts=tuple(allowed_hosts), share_url=share_url)
    return Middleware(HostGuard, policy=policy, throttle=throttle)
