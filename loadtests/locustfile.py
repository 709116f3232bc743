"""Load test for a ring rollout: sticky users, anonymous visitors, a realistic API mix.

    locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 30s --host http://127.0.0.1:8080

Each locust user is a stream of *visits*.  A visit is one visitor with a fixed identity:

* a user of a fixed pool (``user-0000`` … ``user-4999``), sending the id as the
  ``X-User-Id`` header, the ``uid`` cookie or both (the demo route's sticky keys); a fixed
  ~5 % of the ids are beta testers and also send ``X-Beta: true``;
* or, with ``--ringproxy-anonymous`` (30 %), an anonymous visitor with an empty cookie jar
  who keeps the ``ringproxy_uid`` cookie the proxy sets.

A visit makes ``--ringproxy-visit`` requests (2 to 12) with ``--ringproxy-think`` seconds
(0.02 to 0.2) between them, then the locust user starts the next visit as someone else.  Ids
come back: the same user id is picked again by other locust users over a run, and must
land in the same ring every time.

Every response is checked: status 200, an ``X-Ring`` header (the route needs
``decision.response: true``), and, when the upstream says so (the demo's do), that the
answering pool is the ring's pool and that the upstream saw the same ring.  At the end the
ring report (``loadtests/ringmix.py``) is printed; the process exits 1 if a user was seen
in two rings, was not in the ring the config predicts, a bucket share is outside its
tolerance, or the error rate is above ``--ringproxy-max-error-rate``.  The report covers
one locust process: do not use ``--processes`` or master/worker mode with it.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import sys
from pathlib import Path
from typing import Any

from locust import HttpUser, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # proxy, loadtests

from loadtests import ringmix
from proxy.errors import ConfigError

log = logging.getLogger("ringproxy.locust")


class _State:
    expectation: ringmix.Expectation
    recorder = ringmix.Recorder()
    report: ringmix.Report | None = None
    pool = 5000
    anonymous = 0.3
    beta = 0.05
    beta_header = ("X-Beta", "true")
    visit = (2.0, 12.0)
    think = (0.02, 0.2)
    max_error_rate = 0.01
    report_path = ""
    base = "/api"
    host_header: str | None = None
    headless = False


STATE = _State()
_visits = itertools.count(1)


def _default_config() -> str:
    """config/demo.yaml, relative when run from the repository (as it then prints)."""
    try:
        return str(ringmix.DEFAULT_CONFIG.relative_to(Path.cwd()))
    except ValueError:
        return str(ringmix.DEFAULT_CONFIG)


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    group = parser.add_argument_group("ringproxy ring report")
    group.add_argument("--ringproxy-config", env_var="RINGPROXY_CONFIG",
                       default=_default_config(),
                       help="the proxy's config file, for the rings, weights and sticky keys "
                            "(default: config/demo.yaml)")
    group.add_argument("--ringproxy-route", env_var="RINGPROXY_ROUTE", default="",
                       help="the route to load (default: the first with sticky buckets)")
    group.add_argument("--ringproxy-users", type=int, default=5000,
                       help="size of the user id pool (default 5000)")
    group.add_argument("--ringproxy-anonymous", type=float, default=0.3,
                       help="share of visits by anonymous visitors (default 0.3)")
    group.add_argument("--ringproxy-beta", type=float, default=0.05,
                       help="share of pool ids that are beta testers (default 0.05)")
    group.add_argument("--ringproxy-beta-header", default="X-Beta: true",
                       help="what beta testers send (default 'X-Beta: true')")
    group.add_argument("--ringproxy-visit", default="2-12",
                       help="requests per visit, MIN-MAX (default 2-12); 0 keeps one "
                            "identity for a locust user's whole life")
    group.add_argument("--ringproxy-think", default="0.02-0.2",
                       help="seconds between a visitor's requests, MIN-MAX (default 0.02-0.2)")
    group.add_argument("--ringproxy-max-error-rate", type=float, default=0.01,
                       help="exit 1 above this share of failed requests (default 0.01)")
    group.add_argument("--ringproxy-report", env_var="RINGPROXY_REPORT", default="",
                       help="also write the ring report as JSON to this path")


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    o = environment.parsed_options
    if o is None:  # used as a library: defaults
        STATE.expectation = ringmix.load_expectation(ringmix.DEFAULT_CONFIG)
        return
    try:
        STATE.expectation = ringmix.load_expectation(o.ringproxy_config, o.ringproxy_route or None)
        STATE.visit = ringmix.parse_range(o.ringproxy_visit, "--ringproxy-visit")
        STATE.think = ringmix.parse_range(o.ringproxy_think, "--ringproxy-think")
        STATE.beta_header = ringmix.parse_header(o.ringproxy_beta_header)
    except (ConfigError, ValueError) as exc:
        sys.exit(f"ringproxy locustfile: {exc}")
    STATE.pool = max(1, o.ringproxy_users)
    STATE.anonymous = o.ringproxy_anonymous
    STATE.beta = o.ringproxy_beta
    STATE.max_error_rate = o.ringproxy_max_error_rate
    STATE.report_path = o.ringproxy_report
    STATE.headless = bool(o.headless)
    route = STATE.expectation.route
    STATE.base = "/api" if route.path_prefix == "/" else route.path_prefix.rstrip("/")
    STATE.host_header = next((h for h in route.hosts if not h.startswith("*")), None)
    if not STATE.expectation.channels:
        log.warning("route %s has no header or cookie sticky key: every visitor is anonymous",
                    route.name)
    if isinstance(environment.runner, MasterRunner | WorkerRunner):
        log.warning("the ring report covers one process: run without --processes/--master")


@events.test_start.add_listener
def _start(**_: Any) -> None:
    STATE.recorder = ringmix.Recorder()
    STATE.report = None


@events.request.add_listener
def _on_request(
    context: dict[str, Any], response: Any, response_time: float, exception: Any, **_: Any
) -> None:
    visit = context.get("ringproxy_visit")
    if not isinstance(visit, Visit):
        return
    headers = getattr(response, "headers", None) or {}
    STATE.recorder.record(
        visit.identity, headers.get("X-Ring"), response_time, exception is None,
        reason=headers.get("X-Ring-Reason"), predicted=visit.predicted, bucketed=visit.bucketed,
    )


def _finish(environment: Environment) -> ringmix.Report:
    """Build the report once per test (test_stop, or quitting when Ctrl-C comes first)."""
    if STATE.report is None:
        STATE.report = ringmix.build_report(
            STATE.recorder, STATE.expectation, STATE.max_error_rate)
        if STATE.report_path:
            Path(STATE.report_path).write_text(
                json.dumps(STATE.report.as_dict(), indent=2) + "\n", encoding="utf-8")
        if not STATE.headless:
            print("\n" + ringmix.format_report(STATE.report) + "\n", flush=True)
    return STATE.report


@events.test_stop.add_listener
def _stop(environment: Environment, **_: Any) -> None:
    _finish(environment)


@events.quitting.add_listener
def _quitting(environment: Environment, **_: Any) -> None:
    if not _finish(environment).passed:
        environment.process_exit_code = 1


@events.quit.add_listener
def _quit(**_: Any) -> None:
    # Headless: after locust's own tables, so the verdict is the last thing printed.
    if STATE.report is not None and STATE.headless:
        print("\n" + ringmix.format_report(STATE.report) + "\n", flush=True)


class Visit:
    """One visitor: who they are, what they send, which ring the config gives them."""

    def __init__(self, persona: ringmix.Persona, requests: int) -> None:
        e = STATE.expectation
        self.persona = persona
        self.left = requests
        self.headers = persona.headers(e.user_header, STATE.beta_header)
        if STATE.host_header:
            self.headers["Host"] = STATE.host_header
        self.cookies = persona.cookies(e.user_cookie)
        self.identity = f"user:{persona.uid}" if persona.uid else f"anonymous-visit:{next(_visits)}"
        self.predicted: str | None = None
        self.bucketed = False
        if persona.uid is not None or e.anonymous_cookie is None:
            # (an anonymous visitor on a route without anonymous ids: the default ring)
            self.predicted, self.bucketed = e.predict(self.headers, self.cookies)

    def learn_anonymous_id(self, value: str) -> None:
        """The proxy gave this visitor an id: from now on that is who they are."""
        e = STATE.expectation
        self.identity = f"anonymous:{value}"
        assert e.anonymous_cookie is not None
        self.predicted, self.bucketed = e.predict({}, {e.anonymous_cookie: value})


class RingUser(HttpUser):
    """A stream of visits; see the module docstring."""

    def wait_time(self) -> float:
        return random.uniform(*STATE.think)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.visit = self.new_visit()

    def new_visit(self) -> Visit:
        persona = ringmix.pick_persona(self.rng, STATE.pool, STATE.anonymous, STATE.beta,
                                       STATE.expectation.channels)
        lo, hi = STATE.visit
        self.client.cookies.clear()
        visit = Visit(persona, self.rng.randint(max(1, int(lo)), int(hi)) if hi else -1)
        for name, value in visit.cookies.items():
            self.client.cookies.set(name, value)
        return visit

    def send(self, method: str, path: str, name: str, body: bytes | None = None) -> None:
        if self.visit.left == 0:
            self.visit = self.new_visit()
        visit = self.visit
        visit.left -= 1
        headers = dict(visit.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        with self.client.request(
            method, STATE.base + path, name=STATE.base + name, data=body, headers=headers,
            catch_response=True, allow_redirects=False, context={"ringproxy_visit": visit},
        ) as resp:
            anon = STATE.expectation.anonymous_cookie
            if visit.persona.uid is None and anon and anon in resp.cookies:
                visit.learn_anonymous_id(resp.cookies[anon])
            problem = check(resp, method)
            if problem:
                resp.failure(problem)
            else:
                resp.success()

    # The mix: mostly reads, with writes that carry JSON bodies of 200 B to 4 KiB.

    @task(30)
    def browse_catalog(self) -> None:
        self.send("GET", f"/catalog?page={self.rng.randrange(1, 20)}&limit=20", "/catalog")

    @task(25)
    def view_product(self) -> None:
        self.send("GET", f"/products/{self.rng.randrange(1, 5000)}", "/products/[id]")

    @task(12)
    def view_cart(self) -> None:
        self.send("GET", "/cart", "/cart")

    @task(10)
    def add_to_cart(self) -> None:
        body = ringmix.json_body(self.rng, self.rng.randrange(200, 600))
        self.send("POST", "/cart/items", "/cart/items", body)

    @task(10)
    def send_events(self) -> None:
        body = ringmix.json_body(self.rng, self.rng.randrange(1024, 4096))
        self.send("POST", "/events", "/events", body)

    @task(5)
    def place_order(self) -> None:
        body = ringmix.json_body(self.rng, self.rng.randrange(800, 3000))
        self.send("POST", "/orders", "/orders", body)

    @task(5)
    def update_profile(self) -> None:
        body = ringmix.json_body(self.rng, self.rng.randrange(300, 1200))
        self.send("PUT", "/profile", "/profile", body)

    @task(3)
    def remove_from_cart(self) -> None:
        self.send("DELETE", f"/cart/items/{self.rng.randrange(1, 50)}", "/cart/items/[id]")


def check(resp: Any, method: str) -> str | None:
    """What is wrong with a response, or None."""
    if resp.status_code != 200:
        return f"status {resp.status_code}"
    ring = resp.headers.get("X-Ring")
    if not ring:
        return "no X-Ring response header (the route needs decision.response: true)"
    pool = STATE.expectation.pools.get(ring)
    version = resp.headers.get("X-Upstream-Version")  # the demo upstreams say who they are
    if pool is not None and version is not None and version != pool:
        return f"ring {ring} was answered by pool {version}, not {pool}"
    if resp.headers.get("Content-Type", "").startswith("application/json"):
        try:
            doc = resp.json()
        except ValueError:
            return "invalid JSON body"
        if isinstance(doc, dict) and "ring" in doc:
            if doc["ring"] != ring:
                return f"the upstream saw ring {doc['ring']}, the client {ring}"
            if doc.get("method", method) != method:
                return f"the upstream saw {doc.get('method')}, not {method}"
    return None

