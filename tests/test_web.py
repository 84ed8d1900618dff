"""``trainbus web`` in a real browser: a real daemon, a real ``trainbus web`` subprocess on
an OS-chosen port, real headless Chromium (Debian's ``chromium``) driven by playwright.

What a viewer sees is checked where the viewer sees it: text and classes in the DOM,
pixels of the sparkline canvas, the page's console, and every request the page makes
(none may leave the server's origin). Screenshots go to ``$TRAINBUS_ARTEFACTS`` (default
``<tmp>/trainbus-artefacts/web``), kept after the run as test artefacts; one of them is the
README's ``docs/web.png`` (refreshed with ``TRAINBUS_UPDATE_SCREENSHOT=1``).

Without Chromium or playwright the browser tests skip with the reason; the server-side
tests (headers, 403/405, the slow-client drop) run anyway.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bus.publisher import EventPublisher
from consumers import web
from consumers.monitor_state import MonitorState
from tests.conftest import REPO, DaemonHandle, ProcessGroup, ppo_fields, trainbus_cmd, wait_for

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/lib/chromium/chromium")
                 if os.path.exists(p)), None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTEFACTS = Path(os.environ.get("TRAINBUS_ARTEFACTS")
                 or Path(tempfile.gettempdir()) / "trainbus-artefacts" / "web")
DEADLINE_MS = 10_000


def _browser_skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[web-test]')"
    if CHROMIUM is None:
        return "Chromium is not installed (apt-get install -y chromium; .ci/run does this)"
    return None


BROWSER_SKIP = _browser_skip_reason()
needs_browser = pytest.mark.skipif(BROWSER_SKIP is not None, reason=BROWSER_SKIP or "")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if BROWSER_SKIP:
        pytest.skip(BROWSER_SKIP)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class WebProc:
    def __init__(self, proc: Any, url: str, token_url: str | None) -> None:
        self.proc = proc
        self.url = url
        self.token_url = token_url
        parsed = urllib.parse.urlsplit(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80


def start_web(procs: ProcessGroup, daemon: DaemonHandle, *extra: str) -> WebProc:
    proc = procs.start(trainbus_cmd("web", "--port", "0", *extra), env=daemon.env)
    url = proc.stdout.wait_for_line(r"serving (http://\S+)", 20).group(1)
    token_url = None
    if "--token" in extra or "--bind" in extra:
        token_url = proc.stdout.wait_for_line(r"open (http://\S+\?token=\S+)", 5).group(1)
    return WebProc(proc, url, token_url)


class Page:
    """A page with its console errors and its requests recorded."""

    def __init__(self, browser: Any, url: str, name: str) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 700})
        self.page = self.context.new_page()
        self.name = name
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(url)

    def shot(self, suffix: str = "") -> Path:
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTEFACTS / f"{self.name}{suffix}.png"
        self.page.screenshot(path=str(path))
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def pages(browser: Any, request: Any) -> Iterator[Any]:
    opened: list[Page] = []

    def open_page(url: str, suffix: str = "") -> Page:
        page = Page(browser, url, request.node.name + suffix)
        opened.append(page)
        return page

    try:
        yield open_page
    finally:
        for page in opened:
            try:
                page.shot("-final")
            except Exception:
                pass
            page.close()


@pytest.fixture
def publisher(daemon: DaemonHandle) -> Iterator[EventPublisher]:
    pub = EventPublisher(daemon.publish)
    assert pub.wait_for_bus(10)
    try:
        yield pub
    finally:
        pub.close()


def send_update(pub: EventPublisher, run: str, worker: int, update: int, grad: float,
                **overrides: Any) -> None:
    fields = ppo_fields(update, grad, **overrides)
    if not math.isfinite(grad) or grad > 0.5:
        fields["max_grad_norm"] = math.inf
    pub.publish("ppo_update", run, worker, fields)


def send_alert(pub: EventPublisher, run: str, worker: int, state: str, summary: str) -> None:
    pub.publish("alert", run, worker, {
        "state": state, "severity": "critical", "rule": "grad_norm_high", "metric": "grad_norm",
        "since": time.time() - 5, "value": 15.3, "threshold": 10.0, "summary": summary,
        "transition": "fired" if state == "firing" else "resolved"})


def cell(run: str, worker: int, metric: str) -> str:
    return f'tr[data-id="{run}/{worker}"] td[data-metric="{metric}"]:not(.c-spark)'


def spark(run: str, worker: int, metric: str = "grad_norm") -> str:
    return f'tr[data-id="{run}/{worker}"] canvas[data-metric="{metric}"]'


def assert_clean(page: Page, base: str) -> None:
    origin = urllib.parse.urlsplit(base)
    outside = [u for u in page.requests
               if urllib.parse.urlsplit(u).netloc != origin.netloc and not u.startswith("data:")]
    assert outside == [], f"requests outside the server: {outside}"
    assert page.errors == [], f"console errors: {page.errors}"


# --------------------------------------------------------------------- browser tests


@needs_browser
def test_page_loads_clean_and_an_event_lands_in_its_row(procs, daemon, publisher, pages):
    w = start_web(procs, daemon)
    page = pages(w.url)
    page.page.wait_for_selector("#conn:text('connected')", timeout=DEADLINE_MS)
    send_update(publisher, "run-a", 0, 1, 0.25)
    send_update(publisher, "run-a", 3, 7, 1.234)
    send_update(publisher, "run-b", 3, 2, 0.75)
    locator = page.page.locator(cell("run-a", 3, "grad_norm"))
    locator.wait_for(timeout=DEADLINE_MS)
    page.page.wait_for_function(
        "s => document.querySelector(s) && document.querySelector(s).textContent === '1.234'",
        arg=cell("run-a", 3, "grad_norm"), timeout=DEADLINE_MS)
    row = page.page.locator('tr[data-id="run-a/3"]')
    assert row.locator("td").nth(10).text_content() == "7"  # the update column
    assert page.page.locator(cell("run-b", 3, "grad_norm")).text_content() == "0.750"
    # Rows sit under their own run's fleet row.
    assert page.page.locator('tbody[data-run="run-a"] tr[data-id="run-a/3"]').count() == 1
    page.page.wait_for_selector("#banner:text('LEARNING')", timeout=DEADLINE_MS)
    page.shot()
    assert_clean(page, w.url)


@needs_browser
def test_nan_shows_the_red_glyph_and_critical_colours_the_row(procs, daemon, publisher, pages):
    w = start_web(procs, daemon)
    page = pages(w.url)
    page.page.wait_for_selector("#conn:text('connected')", timeout=DEADLINE_MS)
    for update in range(1, 4):
        send_update(publisher, "r", 0, update, 0.3)
        send_update(publisher, "r", 1, update, 0.3)
    send_update(publisher, "r", 0, 4, math.nan)
    send_update(publisher, "r", 1, 4, 12.0)
    p = page.page
    p.wait_for_selector('tr[data-id="r/0"].st-nan', timeout=DEADLINE_MS)
    p.wait_for_selector('tr[data-id="r/1"].st-critical', timeout=DEADLINE_MS)
    nan_cell = p.locator(cell("r", 0, "grad_norm"))
    assert nan_cell.text_content() == "NaN"
    assert "h-nonfinite" in (nan_cell.get_attribute("class") or "")
    canvas = p.locator(spark("r", 0))
    assert canvas.get_attribute("data-nonfinite") == "1"
    # The glyph itself, in pixels: a red cross in the newest (rightmost) of the 10 cells
    # reaches the cell's top rows; the flat finite bars before it (mid-height, and red too:
    # like the console, bars take the colour of the latest value) do not.
    red = p.evaluate("""(sel) => {
        const c = document.querySelector(sel);
        const ctx = c.getContext('2d');
        const cw = Math.floor(c.width / 10), top = Math.floor(c.height / 4);
        const count = (i) => { const d = ctx.getImageData(i * c.width / 10, 0, cw, top).data; let n = 0;
            for (let k = 0; k < d.length; k += 4) if (d[k] > 200 && d[k+1] < 120 && d[k+2] < 120 && d[k+3] > 0) n++;
            return n; };
        return [count(9), count(8), count(6)];
    }""", spark("r", 0))
    assert red[0] > 2 and red[1] == 0 and red[2] == 0, red
    crit = p.locator(cell("r", 1, "grad_norm"))
    assert crit.text_content() == "12.000"
    assert "h-critical" in (crit.get_attribute("class") or "")
    assert p.locator('tr[data-id="r/1"] td.c-status').text_content().startswith("CRIT")
    p.wait_for_selector("#banner:text('NaN DETECTED')", timeout=DEADLINE_MS)
    page.shot()
    assert_clean(page, w.url)


@needs_browser
def test_alert_appears_and_leaves_and_markup_renders_as_text(procs, daemon, publisher, pages):
    w = start_web(procs, daemon)
    page = pages(w.url)
    p = page.page
    p.wait_for_selector("#conn:text('connected')", timeout=DEADLINE_MS)
    hostile = "<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\">boom"
    send_update(publisher, "r", 2, 1, 0.3)
    send_alert(publisher, "r", 2, "firing", hostile)
    item = p.locator('#alert-list li[data-key="r/2/grad_norm_high"]')
    item.wait_for(timeout=DEADLINE_MS)
    assert hostile in item.text_content()
    assert p.locator("#alert-list script, #alert-list img").count() == 0
    assert p.evaluate("window.__pwned") is None
    assert p.locator("#alerts").is_visible()
    p.wait_for_selector("#banner:text('CRITICAL')", timeout=DEADLINE_MS)
    page.shot("-firing")
    send_alert(publisher, "r", 2, "resolved", hostile)
    item.wait_for(state="detached", timeout=DEADLINE_MS)
    assert not p.locator("#alerts").is_visible()
    assert p.evaluate("window.__pwned") is None
    # No request for the <img src=x> the summary held: it never became an element.
    assert_clean(page, w.url)
    assert not any(u.endswith("/x") for u in page.requests)


@needs_browser
def test_late_opened_page_shows_ten_entry_sparklines_at_once(procs, daemon, publisher, pages):
    for update in range(15):
        send_update(publisher, "late", 0, update, 0.2 + 0.05 * update)
    # The web process starts after the events: it has them only from the daemon's snapshot.
    w = start_web(procs, daemon)
    page = pages(w.url)
    p = page.page
    canvas = p.locator(spark("late", 0))
    canvas.wait_for(timeout=DEADLINE_MS)
    cells = canvas.get_attribute("data-cells").split(",")
    assert len(cells) == 10 and "-1" not in cells, cells  # ten values, no padding
    assert cells[-1] == "7" and cells[0] == "0", cells  # rising: lowest first, highest last
    assert p.locator(cell("late", 0, "grad_norm")).text_content() == "0.900"
    assert p.evaluate("window.trainbus.inits") == 1
    # Click the row: the longer chart opens with every update the web process has seen.
    p.locator('tr[data-id="late/0"] td.c-worker').click()
    p.wait_for_function("() => document.querySelector('#chart-note').textContent.includes('10 updates')",
                        timeout=DEADLINE_MS)
    page.shot()
    assert_clean(page, w.url)


@needs_browser
def test_page_resumes_after_the_web_process_restarts(procs, daemon, publisher, pages):
    w = start_web(procs, daemon)
    page = pages(w.url)
    p = page.page
    send_update(publisher, "r", 0, 1, 0.3)
    p.wait_for_selector('tr[data-id="r/0"]', timeout=DEADLINE_MS)
    w.proc.signal(15)
    assert w.proc.wait(10) == 0
    p.wait_for_selector("#conn.bad", timeout=DEADLINE_MS)
    procs.start(trainbus_cmd("web", "--port", str(w.port)), env=daemon.env) \
        .stdout.wait_for_line(r"serving", 20)
    send_update(publisher, "r", 0, 2, 0.4)
    p.wait_for_function("() => window.trainbus.inits >= 2", timeout=15_000)
    p.wait_for_function(
        "s => document.querySelector(s) && document.querySelector(s).textContent === '0.400'",
        arg=cell("r", 0, "grad_norm"), timeout=DEADLINE_MS)
    assert p.locator("#conn:not(.bad)").count() == 1


@needs_browser
def test_token_gets_a_cookie_and_the_page_works(procs, daemon, publisher, pages):
    w = start_web(procs, daemon, "--token")
    assert w.token_url and "?token=" in w.token_url
    page = pages(w.token_url)
    p = page.page
    p.wait_for_selector("#conn:text('connected')", timeout=DEADLINE_MS)
    assert "token" not in p.url  # redirected away: the token does not stay in the address bar
    cookies = page.context.cookies()
    assert len(cookies) == 1 and cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
    send_update(publisher, "r", 0, 1, 0.3)
    p.wait_for_selector('tr[data-id="r/0"]', timeout=DEADLINE_MS)
    assert_clean(page, w.url)


@needs_browser
def test_screenshot_for_the_readme(procs, daemon, publisher, pages):
    """A realistic page (two runs, a NaN, a warning, a firing alert, the chart open):
    kept as an artefact, and copied to docs/web.png with TRAINBUS_UPDATE_SCREENSHOT=1."""
    w = start_web(procs, daemon)

    def lunar(update: int) -> None:
        send_update(publisher, "lunar-91c0", 0, update, 0.4 + 0.01 * update,
                    episode_return_mean=-100 + 4 * update, explained_variance=0.6)

    def lunar_points() -> int:
        response = http_get(w.host, w.port, "/api/history?run=lunar-91c0&worker=0")
        return len(json.loads(response.body)["points"]) if response.status == 200 else 0

    # The chart must count all 30 updates, and a late joiner's snapshot holds only the last
    # 10 per stream: so wait until the page's server is live on the bus first. Update 1
    # seen (live or from its snapshot) means its snapshot is in; update 2, sent after
    # that, can only arrive live, so its subscription is in place at the daemon.
    for update in (1, 2):
        lunar(update)
        wait_for(lambda n=update: lunar_points() >= n, 10, message=f"web sees lunar update {update}")
    for update in range(1, 31):
        for worker in range(4):
            grad = 0.3 + 0.05 * math.sin(update / 3 + worker)
            pre = 2.0 + math.sin(update / 2 + worker) + (30 if worker == 2 and update > 25 else 0)
            if worker == 3 and update == 30:
                grad = math.nan
            send_update(publisher, "cartpole-3f2a", worker, update, grad, pre_clip_grad_norm=pre,
                        max_grad_norm=0.5, episode_return_mean=20 + 6 * update,
                        explained_variance=0.8, approx_kl=0.004 + 0.0004 * worker)
        if update > 2:
            lunar(update)
    send_alert(publisher, "cartpole-3f2a", 3, "firing", "non-finite gradient")
    page = pages(w.url)
    p = page.page
    p.wait_for_selector('tr[data-id="cartpole-3f2a/3"].st-nan', timeout=DEADLINE_MS)
    p.wait_for_selector('#alert-list li', timeout=DEADLINE_MS)
    p.locator('tr[data-id="cartpole-3f2a/2"] td[data-metric="pre_clip_grad_norm"]').first.click()
    p.wait_for_function("() => document.querySelector('#chart-note').textContent.includes('30 updates')",
                        timeout=DEADLINE_MS)
    path = page.shot()
    if os.environ.get("TRAINBUS_UPDATE_SCREENSHOT"):
        shutil.copy(path, REPO / "docs" / "web.png")
    assert_clean(page, w.url)


# --------------------------------------------------------------------- HTTP, no browser


def http_get(host: str, port: int, path: str, method: str = "GET",
             headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    response.body = response.read()  # type: ignore[attr-defined]
    conn.close()
    return response


def test_read_only_strict_headers_and_host_check(procs, daemon):
    w = start_web(procs, daemon)
    ok = http_get(w.host, w.port, "/")
    assert ok.status == 200
    csp = ok.getheader("Content-Security-Policy") or ""
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert ok.getheader("X-Content-Type-Options") == "nosniff"
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert http_get(w.host, w.port, "/", method).status == 405, method
    assert http_get(w.host, w.port, "/app.js").getheader("Content-Type").startswith("text/javascript")
    assert http_get(w.host, w.port, "/nope").status == 404
    # DNS rebinding: a page on another name that resolves to 127.0.0.1 must not read it.
    assert http_get(w.host, w.port, "/", headers={"Host": f"evil.example:{w.port}"}).status == 403
    assert http_get(w.host, w.port, "/", headers={"Host": f"localhost:{w.port}"}).status == 200


def test_non_loopback_bind_needs_the_token(procs, daemon):
    """Bound to every interface (non-loopback): a token is generated and printed once as a
    URL; a request with no token or a wrong one gets 403, the right one a cookie."""
    w = start_web(procs, daemon, "--bind", "0.0.0.0")
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(w.token_url).query)["token"][0]
    assert len(token) >= 24
    for path in ("/", "/events", "/app.js", "/api/history?run=r&worker=0", "/?token=wrong"):
        assert http_get("127.0.0.1", w.port, path).status == 403, path
    cookie_name = f"trainbus_web_{w.port}"
    assert http_get("127.0.0.1", w.port, "/", headers={"Cookie": f"{cookie_name}=wrong"}).status == 403
    good = http_get("127.0.0.1", w.port, f"/?token={token}")
    assert good.status == 303 and good.getheader("Location") == "/"
    set_cookie = good.getheader("Set-Cookie") or ""
    assert set_cookie.startswith(f"{cookie_name}={token}")
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    assert http_get("127.0.0.1", w.port, "/", headers={"Cookie": f"{cookie_name}={token}"}).status == 200
    assert w.proc.stdout.text().count(token) == 1  # printed once


def test_insecure_non_loopback_warns_loudly(procs, daemon):
    proc = procs.start(trainbus_cmd("web", "--port", "0", "--bind", "0.0.0.0", "--insecure"),
                       env=daemon.env)
    proc.stdout.wait_for_line(r"serving", 20)
    assert "WITHOUT authentication" in proc.stderr.text()
    assert "token=" not in proc.stdout.text()


def test_slow_client_is_dropped_without_slowing_the_others():
    """A page that stops reading fills its bounded queue and is dropped (socket shut, so a
    blocked write ends); the other page keeps getting every message."""
    hub = web.WebHub(MonitorState())
    stuck, live = web.Client(None), web.Client(None)
    hub.clients.update({stuck, live})
    for i in range(web.CLIENT_QUEUE + 5):
        hub.broadcast(f"data: {i}\n\n".encode())
        while not live.queue.empty():  # the healthy page keeps up
            live.queue.get_nowait()
    assert stuck.dropped and stuck not in hub.clients and hub.clients_dropped == 1
    assert not live.dropped and live in hub.clients


def test_non_finite_numbers_are_strict_json():
    assert web.dumps([web.num(math.nan), web.num(math.inf), web.num(-math.inf), web.num(1.5)]) \
        == '["nan","inf","-inf",1.5]'
    assert web.spark_levels([1.0, math.nan]) == [-1] * 8 + [3, -2]


def test_page_assets_are_package_data():
    """What a non-editable install serves: every asset the page names is in the package
    and listed as package data."""
    static = web.load_static()
    assert {"index.html", "app.js", "style.css", "favicon.svg"} <= set(static)
    html = static["index.html"].decode()
    assert "<script>" not in html and "style=" not in html  # nothing inline (CSP)
    assert 'web_static/*' in (REPO / "pyproject.toml").read_text()
    assert "innerHTML" not in static["app.js"].decode()


@needs_browser
def test_run_with_more_workers_than_rows_gets_the_fleet_view(procs, daemon, publisher, pages):
    """--max-rows 4 and 8 workers: the distribution row and the worst workers, not all."""
    w = start_web(procs, daemon, "--max-rows", "4")
    page = pages(w.url)
    p = page.page
    p.wait_for_selector("#conn:text('connected')", timeout=DEADLINE_MS)
    for worker in range(8):
        send_update(publisher, "wide", worker, 1, 12.0 if worker == 5 else 0.3)
    p.wait_for_selector('tbody[data-run="wide"] tr.dist', timeout=DEADLINE_MS)
    p.wait_for_selector('tr[data-id="wide/5"].st-critical', timeout=DEADLINE_MS)
    dist = p.locator('tbody[data-run="wide"] tr.dist').text_content()
    assert dist.startswith("8 workers") and "grad_norm p50 0.300" in dist and "max 12.000" in dist, dist
    assert p.locator('tbody[data-run="wide"] tr.worker').count() == 4  # the worst 4
    assert "4 more worker(s) not shown" in p.locator('tbody[data-run="wide"] tr.more').text_content()
    page.shot()
    assert_clean(page, w.url)


def test_web_rows_colour_as_the_console_does_under_a_rules_override(tmp_path):
    """One judgement for both views: a --rules override moves the web row's health exactly
    where it moves the console's style."""
    from consumers.health import load_health
    from consumers.monitor_view import HEALTH_STYLE, NONFINITE_STYLE, row_value_style
    from tests.test_monitor import update

    rules = tmp_path / "rules.toml"
    rules.write_text("[rules.grad_norm_high]\nwarning = 0.2\ncritical = 0.4\n")
    health = load_health(rules)
    state = MonitorState(health.table, spikes=health.spikes)
    now = time.monotonic()
    hub = web.WebHub(state)
    for seq, grad in enumerate((0.15, 0.3, 0.5, math.nan)):
        worker = seq
        hub.ingest([update(worker=worker, seq=0, grad_norm=grad, max_grad_norm=math.inf)], now)
    for row in state.rows.values():
        entry = hub._row(row, now, time.time())
        for metric in web.ROW_METRICS:
            health = entry["m"][metric][1]
            as_style = NONFINITE_STYLE if health == "nonfinite" else HEALTH_STYLE.get(health, "")
            assert as_style == row_value_style(state, row, metric), (row.worker, metric, health)
    assert [hub._row(r, now, 0)["m"]["grad_norm"][1] for r in state.sorted_rows()] == \
        ["ok", "warning", "critical", "nonfinite"]


@needs_browser
def test_page_shows_stale_then_disconnected_then_resumes_after_a_daemon_restart(procs, daemon,
                                                                               pages):
    """Time alone makes a worker STALE (no event says so); a killed daemon shows as
    DISCONNECTED; a daemon restarted on the same ports brings the page back, by itself."""
    from tests.conftest import start_daemon

    w = start_web(procs, daemon, "--stale-after", "1")
    page = pages(w.url)
    p = page.page
    p.wait_for_selector("#conn:text('connected')", timeout=DEADLINE_MS)
    pub = EventPublisher(daemon.publish)
    try:
        assert pub.wait_for_bus(10)
        send_update(pub, "r", 0, 1, 0.3)
        p.wait_for_selector('tr[data-id="r/0"].st-ok', timeout=DEADLINE_MS)
        p.wait_for_selector('tr[data-id="r/0"].st-stale', timeout=DEADLINE_MS)
        p.wait_for_selector("#banner:text('STALE')", timeout=DEADLINE_MS)
        daemon.proc.signal(9)
        daemon.proc.wait(5)
        p.wait_for_selector("#banner:text('DISCONNECTED')", timeout=DEADLINE_MS)
        start_daemon(procs, publish=daemon.publish, subscribe=daemon.subscribe,
                     snapshot=daemon.snapshot)
        pub.close()
        pub = EventPublisher(daemon.publish)  # a fresh one waits for the new daemon
        assert pub.wait_for_bus(10)
        send_update(pub, "r", 0, 2, 0.6)
        p.wait_for_function(
            "s => document.querySelector(s) && document.querySelector(s).textContent === '0.600'",
            arg=cell("r", 0, "grad_norm"), timeout=15_000)
        p.wait_for_selector("#banner:text('LEARNING')", timeout=DEADLINE_MS)
    finally:
        pub.close()
    assert p.evaluate("window.trainbus.inits") == 1  # the page never lost its own stream
