"""The studio's HTTP doors (app/http_guard.py): the attacks of issue 12 as tests.

Unit tests drive the middleware over a tiny Starlette app through httpx's ASGI transport (a chosen client address);
the integration tests send raw requests to the session's real studio and to a small studio launched with ``auth``.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app.http_guard import HostGuard, HostPolicy, LoginThrottle


def _run_async(coro):
    """asyncio.run in a thread of its own: the browser tests' Playwright keeps an event loop in the main thread."""
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()

PASSWORD = "right"


class FakeClock:
    """Time for the throttle: ``sleep`` moves it on at once (the waits of a long attack take no real time)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    async def sleep(self, seconds):
        self.now += seconds
        await asyncio.sleep(0)


def tiny_app(started=None):
    """'/' answers ok; POST /login checks the password as Gradio does (400 wrong, 200 right) and counts checks."""
    checks = []

    @contextlib.asynccontextmanager
    async def lifespan(app):
        (started if started is not None else []).append(True)
        yield

    async def home(request):
        return PlainTextResponse("ok")

    async def login(request):
        form = await request.form()
        checks.append(form.get("password"))
        if form.get("password") == PASSWORD:
            return JSONResponse({"success": True})
        return JSONResponse({"detail": "Incorrect credentials."}, status_code=400)

    async def ws(websocket):
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    app = Starlette(routes=[Route("/", home), Route("/login", login, methods=["POST"]),
                            Route("/login/", login, methods=["POST"]), WebSocketRoute("/ws", ws)],
                    lifespan=lifespan)
    return app, checks


def guarded(bound_host="127.0.0.1", allowed_hosts=(), share_url=None, throttle=None, started=None):
    """The tiny app behind a HostGuard; ``.checks`` lists the passwords that reached the app."""
    app, checks = tiny_app(started)
    policy = HostPolicy(bound_host=bound_host, allowed_hosts=allowed_hosts, share_url=share_url)
    guard = HostGuard(app, policy=policy, throttle=throttle or LoginThrottle(failure_delay=0.05))
    guard.checks = checks
    return guard


def get(guard, host, origin=None, client="127.0.0.1"):
    headers = {"Host": host} | ({"Origin": origin} if origin else {})

    async def go():
        transport = httpx.ASGITransport(app=guard, client=(client, 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:7860") as http:
            return await http.get("/", headers=headers)

    return _run_async(go())


@pytest.mark.parametrize("host", ["evil.example", "evil.example:7860", "localhost.evil.example", "127.0.0.1.nip.io",
                                  "attacker.test:80", "", "192.168.1.20:7860"])
def test_a_foreign_host_is_refused_with_the_fix(host):
    response = get(guarded(), host)
    assert response.status_code == 421
    assert "--allowed-hosts" in response.text and response.text != "ok"
    if host:
        assert host.split(":")[0] in response.text
    assert response.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("host", ["localhost", "localhost:7860", "LOCALHOST.", "127.0.0.1:7860", "127.0.0.2",
                                  "[::1]:7860", "[::1]"])
def test_loopback_hosts_are_answered(host):
    response = get(guarded(), host)
    assert (response.status_code, response.text) == (200, "ok")


def test_allowed_hosts_and_the_bound_name_are_answered():
    guard = guarded(bound_host="studio.lan", allowed_hosts=["proxy.example.org", " Other.Example "])
    for host in ["studio.lan:7860", "proxy.example.org", "other.example:443"]:
        assert get(guard, host).status_code == 200, host
    assert get(guard, "evil.example").status_code == 421


def test_a_wildcard_bind_answers_ip_literals_and_this_machine_but_not_other_names():
    guard = guarded(bound_host="0.0.0.0")
    for host in ["192.168.1.20:7860", "10.0.0.5", "[fe80::1]:7860", "localhost", socket.gethostname()]:
        assert get(guard, host).status_code == 200, host
    for host in ["evil.example", "evil.example:7860", "rebind.attacker.test"]:
        assert get(guard, host).status_code == 421, host
    # Bound to one address, another IP is refused.
    assert get(guarded(bound_host="192.168.1.20"), "192.168.1.21").status_code == 421


def test_the_share_host_is_answered_once_the_link_exists():
    link = {"url": None}
    guard = guarded(share_url=lambda: link["url"])
    assert get(guard, "abcd1234.gradio.live").status_code == 421
    link["url"] = "https://abcd1234.gradio.live"
    assert get(guard, "abcd1234.gradio.live").status_code == 200
    assert get(guard, "other.gradio.live").status_code == 421


@pytest.mark.parametrize("origin", ["https://evil.example", "http://evil.example:7860", "null",
                                    "http://192.168.1.66", "http://127.0.0.1.evil.example"])
def test_a_foreign_origin_is_refused(origin):
    response = get(guarded(bound_host="0.0.0.0"), "192.168.1.20:7860", origin=origin)
    assert response.status_code == 403
    assert "another site" in response.text and origin in response.text


@pytest.mark.parametrize("host,origin", [("127.0.0.1:7860", "http://127.0.0.1:7860"),
                                         ("localhost:7860", "http://localhost:7860"),
                                         ("192.168.1.20:7860", "http://192.168.1.20:7860"),
                                         ("localhost:7860", "http://127.0.0.1:7860")])
def test_the_studios_own_origin_is_answered(host, origin):
    assert get(guarded(bound_host="0.0.0.0"), host, origin=origin).status_code == 200


def test_a_refused_websocket_is_closed_and_lifespan_passes_through():
    started = []
    guard = guarded(started=started)
    with TestClient(guard, base_url="http://127.0.0.1:7860") as client:   # runs the lifespan
        with client.websocket_connect("/ws", headers={"Host": "localhost:7860"}) as ws:
            assert ws.receive_text() == "hello"
        with pytest.raises(WebSocketDisconnect) as refused:
            with client.websocket_connect("/ws", headers={"Host": "evil.example"}):
                pass
        assert refused.value.code == 1008
    assert started == [True]


def run_logins(guard, passwords, client="10.1.1.1", parallel=False):
    """POST /login with each password; returns (statuses, texts, seconds)."""
    async def one(http, password):
        return await http.post("/login", data={"username": "u", "password": password})

    async def go():
        transport = httpx.ASGITransport(app=guard, client=(client, 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:7860") as http:
            if parallel:
                return await asyncio.gather(*(one(http, p) for p in passwords))
            return [await one(http, p) for p in passwords]

    started = time.perf_counter()
    responses = _run_async(go())
    return [r.status_code for r in responses], [r.text for r in responses], time.perf_counter() - started


def test_thirty_wrong_logins_are_throttled_and_the_right_one_works_after_the_wait():
    """The attack: 30 wrong logins took 0.03 s. Now each guess past the third waits its turn, doubling up to a minute:
    30 guesses take over 23 minutes, and each still gets the login page's own "incorrect" answer (400)."""
    clock = FakeClock()
    guard = guarded(throttle=LoginThrottle(failure_delay=1.0, clock=clock, sleep=clock.sleep))
    start = clock.now
    statuses, _, _ = run_logins(guard, ["wrong"] * 30)
    assert statuses == [400] * 30
    waits = [2, 4, 8, 16, 32] + [60] * 22
    assert clock.now - start >= 30 * 1.0 + sum(waits)         # 1382 s of waiting, plus a slow answer each
    # Another address is not throttled.
    before = clock.now
    assert run_logins(guard, ["wrong", PASSWORD], client="10.2.2.2")[0] == [400, 200]
    # The right password during the wait is held until it is over, then works; a success starts afresh.
    assert run_logins(guard, [PASSWORD])[0] == [200]
    assert clock.now - before >= 60
    before = clock.now
    assert run_logins(guard, ["wrong"] * 3 + [PASSWORD])[0] == [400, 400, 400, 200]
    assert clock.now - before >= 3 * 1.0 + 2


def test_the_wait_doubles_after_each_failure_up_to_a_minute():
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(3):
        throttle.attempt("a")
    waits = []
    for _ in range(10):
        waits.append(throttle.wait_left("a"))
        clock.now += waits[-1]
        throttle.attempt("a")
    assert waits == [2, 4, 8, 16, 32, 60, 60, 60, 60, 60]
    for _ in range(5000):                         # a very long attack does not overflow
        throttle.attempt("a")
    assert throttle.wait_left("a") == 60


def test_parallel_guesses_do_not_slip_past():
    """20 guesses at once: three are checked, one waits its turn, the rest are refused with the wait to respect."""
    guard = guarded(throttle=LoginThrottle(failure_delay=0.05, first_wait=0.5))     # real time, short waits
    statuses, texts, _ = run_logins(guard, ["wrong"] * 20, parallel=True)
    assert len(guard.checks) == 4 and sorted(statuses) == [400] * 4 + [429] * 16
    assert any("already waiting its turn" in t and "Wait" in t for t in texts)


def test_a_slow_failed_login_does_not_hold_other_requests():
    guard = guarded(throttle=LoginThrottle(failure_delay=1.0))

    async def go():
        transport = httpx.ASGITransport(app=guard, client=("10.3.3.3", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:7860") as http:
            login = asyncio.create_task(http.post("/login", data={"username": "u", "password": "wrong"}))
            await asyncio.sleep(0.1)
            started = time.perf_counter()
            page = await http.get("/")
            page_seconds = time.perf_counter() - started
            return (await login).status_code, page.status_code, page_seconds

    login_status, page_status, page_seconds = _run_async(go())
    assert (login_status, page_status) == (400, 200) and page_seconds < 0.5


def test_the_throttle_forgets_old_and_surplus_addresses():
    clock = FakeClock()
    throttle = LoginThrottle(max_clients=5, forget_after=600, clock=clock)
    for i in range(20):
        throttle.attempt(f"10.0.0.{i}")
    assert len(throttle.failures) == 5
    for _ in range(5):
        throttle.attempt("10.9.9.9")
    assert throttle.wait_left("10.9.9.9") > 0
    clock.now += 601
    assert throttle.wait_left("10.9.9.9") == 0


# ---- the real studio ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["", "gradio_api/info"])
def test_the_studio_refuses_a_rebinding_host_and_a_foreign_origin(studio, path):
    url = studio.url + path
    normal = httpx.get(url, timeout=30)
    assert normal.status_code == 200
    rebinding = httpx.get(url, headers={"Host": "evil.example:7860"}, timeout=30)
    assert rebinding.status_code == 421 and "--allowed-hosts evil.example" in rebinding.text
    foreign = httpx.get(url, headers={"Origin": "https://evil.example"}, timeout=30)
    assert foreign.status_code == 403 and "evil.example" in foreign.text
    own = httpx.get(url, headers={"Origin": studio.url.rstrip("/")}, timeout=30)
    assert own.status_code == 200


def test_the_studio_refuses_a_cross_site_post(studio):
    response = httpx.post(studio.url + "gradio_api/queue/join", json={}, timeout=30,
                          headers={"Origin": "https://evil.example"})
    assert response.status_code == 403


def test_the_studio_keeps_its_cache_bounded(studio):
    assert studio.demo.delete_cache is not None
    frequency, age = studio.demo.delete_cache
    assert 0 < frequency <= 3600 and 0 < age <= 24 * 3600


def test_a_studio_with_auth_throttles_wrong_logins(studio):
    from app.studio import launch_studio

    demo = launch_studio(studio.engine, host="0.0.0.0", port=None, auth=[("alice", "s3cret")],
                         allowed_hosts=["studio.example"], prevent_thread_lock=True, quiet=True)
    try:
        base = demo.local_url   # http://localhost:PORT/ : Gradio's own start-up check passed the guard
        started = time.perf_counter()
        wrong = [httpx.post(base + "login", data={"username": "alice", "password": f"guess{i}"}, timeout=30)
                 for i in range(4)]
        # Gradio's login page shows only a 400 ("incorrect credentials"): the fourth guess waits 2 s, then gets it.
        assert [r.status_code for r in wrong] == [400] * 4
        assert time.perf_counter() - started >= 4 * 0.9 + 2
        port = base.rstrip("/").rsplit(":", 1)[1]
        for host in ["192.168.1.20", "studio.example"]:   # wildcard bind: IP literals and --allowed-hosts
            assert httpx.get(base, headers={"Host": f"{host}:{port}"}, timeout=30).status_code == 200, host
        assert httpx.get(base, headers={"Host": "evil.example"}, timeout=30).status_code == 421
    finally:
        demo.close()
