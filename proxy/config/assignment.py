"""The assignment settings of a route: stickiness key, anonymous cookie, override, headers.

Models and their validation; ``proxy.routing.assign`` compiles them.  Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from proxy.config.reader import Ctx, Section
from proxy.config.rules import Attr, Network, parse_attr
from proxy.config.source import join
from proxy.config.values import TOKEN_RE

_SAME_SITE = {"lax": "Lax", "strict": "Strict", "none": "None"}
_SECURE = ("auto", "always", "never")


@dataclass(frozen=True, slots=True)
class KeySource:
    attr: Attr  # header, cookie or query
    name: str

    def __str__(self) -> str:
        return f"{self.attr.value}:{self.name}"


@dataclass(frozen=True, slots=True)
class AnonymousCookie:
    """Set for requests without a key, so the next request is sticky."""

    name: str = "ringproxy_uid"
    max_age: int = 365 * 24 * 3600  # seconds
    secure: str = "auto"  # auto: Secure when the request came over https
    http_only: bool = True
    same_site: str = "Lax"
    domain: str | None = None
    path: str = "/"

    def attributes(self) -> str:
        """Everything after ``name=value`` in Set-Cookie, except Secure (decided per request)."""
        parts = [f"Max-Age={self.max_age}", f"Path={self.path}"]
        if self.domain:
            parts.append(f"Domain={self.domain}")
        if self.http_only:
            parts.append("HttpOnly")
        parts.append(f"SameSite={self.same_site}")
        return "; " + "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Sticky:
    key: tuple[KeySource, ...]  # first present wins
    salt: str
    anonymous: AnonymousCookie | None = None


@dataclass(frozen=True, slots=True)
class Override:
    """A header and/or cookie naming a ring, honoured only with proof (secret or address)."""

    header: str | None = None  # lower-cased
    cookie: str | None = None
    secret_header: str | None = None  # lower-cased
    secret: str | None = field(default=None, repr=False)
    cidrs: tuple[Network, ...] = ()
    allow_rolled_back: bool = False


@dataclass(frozen=True, slots=True)
class DecisionHeaders:
    reason_upstream: bool = False  # X-Ring-Reason on the upstream request
    response: bool = False  # X-Ring and X-Ring-Reason on the client's response


def read_sticky(ctx: Ctx, data: object, path: str, route: str) -> Sticky | None:
    if data is None:
        return None
    sec = Section(ctx, data, path)
    sources: list[KeySource] = []
    raw_key = sec.raw("key")
    items = raw_key if isinstance(raw_key, list) else [raw_key] if raw_key is not None else []
    if sec.ok and sec.has("key") and not items:
        ctx.err(sec.sub("key"), "list at least one source, e.g. header:X-User-Id")
    for i, item in enumerate(items):
        where = join(sec.sub("key"), i) if isinstance(raw_key, list) else sec.sub("key")
        if not isinstance(item, str):
            ctx.err(where, f"expected a source such as header:X-User-Id, got {item!r}")
            continue
        try:
            attr, name = parse_attr(item)
        except ValueError as exc:
            ctx.err(where, str(exc))
            continue
        if attr not in (Attr.HEADER, Attr.COOKIE, Attr.QUERY):
            ctx.err(where, f"{item!r}: a stickiness key comes from a header, cookie or query")
            continue
        sources.append(KeySource(attr, name))
    salt = sec.text("salt", route) or route
    anonymous = _read_anonymous(ctx, sec.raw("anonymous", None), sec.sub("anonymous"))
    sec.close()
    if anonymous is not None and KeySource(Attr.COOKIE, anonymous.name) not in sources:
        sources.append(KeySource(Attr.COOKIE, anonymous.name))  # read back what we set
    return Sticky(tuple(sources), salt, anonymous)


def _read_anonymous(ctx: Ctx, data: object, path: str) -> AnonymousCookie | None:
    if data is None or data is False:
        return None
    if data is True:
        return AnonymousCookie()
    sec = Section(ctx, data, path)
    base = AnonymousCookie()
    name = sec.text("cookie", base.name) or base.name
    if not TOKEN_RE.match(name):
        ctx.err(sec.sub("cookie"), f"{name!r} is not a valid cookie name")
    max_age = sec.duration("max_age", float(base.max_age), minimum=1.0)
    secure = sec.text("secure", base.secure)
    if secure not in _SECURE:
        ctx.err(sec.sub("secure"), f"{secure!r} is not one of: {', '.join(_SECURE)}")
        secure = base.secure
    same_site_raw = sec.text("same_site", base.same_site)
    same_site = _SAME_SITE.get(same_site_raw.lower(), "")
    if not same_site:
        ctx.err(sec.sub("same_site"), f"{same_site_raw!r} is not one of: Lax, Strict, None")
        same_site = base.same_site
    if same_site == "None" and secure != "always":
        ctx.err(sec.sub("same_site"),
                "SameSite=None needs secure: always (browsers drop it otherwise)")
    domain = sec.text("domain", "") or base.domain
    cookie_path = sec.text("path", base.path) or base.path
    for key, value in (("domain", domain or ""), ("path", cookie_path)):
        if any(c in value for c in ";,\r\n ") :
            ctx.err(sec.sub(key), f"{value!r} cannot contain ';', ',', spaces or line breaks")
    result = AnonymousCookie(
        name, int(max_age), secure, sec.flag("http_only", base.http_only), same_site, domain,
        cookie_path,
    )
    sec.close()
    return result


def read_override(ctx: Ctx, data: object, path: str) -> Override | None:
    if data is None:
        return None
    sec = Section(ctx, data, path)
    header = sec.text("header", "") or None
    cookie = sec.text("cookie", "") or None
    secret_header = sec.text("secret_header", "") or None
    secret = sec.text("secret", "") or None
    for key, value in (("header", header), ("secret_header", secret_header), ("cookie", cookie)):
        if value is not None and not TOKEN_RE.match(value):
            ctx.err(sec.sub(key), f"{value!r} is not a valid {key.split('_')[-1]} name")
    if sec.ok and header is None and cookie is None:
        ctx.err(path, "an override needs a header and/or a cookie that names the ring")
    if (secret is None) != (secret_header is None):
        ctx.err(path, "secret and secret_header go together")
    if secret is not None and sec.sub("secret") not in ctx.env_paths:
        ctx.err(sec.sub("secret"), "a secret must come from the environment, "
                "e.g. secret: ${RINGPROXY_OVERRIDE_SECRET}, never from the file itself")
    if secret is not None and len(secret) < 16:
        ctx.err(sec.sub("secret"), "the secret is shorter than 16 characters")
    cidrs: list[Network] = []
    raw = sec.raw("cidrs", [])
    for i, item in enumerate(raw if isinstance(raw, list) else [raw]):
        try:
            cidrs.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            ctx.err(join(sec.sub("cidrs"), i), f"{item!r} is not a network, e.g. 10.0.0.0/8")
    if sec.ok and secret is None and not cidrs:
        ctx.err(path, "an override must be guarded: set secret_header + secret, or cidrs "
                "(otherwise any client could pick its ring)")
    allow = sec.flag("allow_rolled_back", Override().allow_rolled_back)
    sec.close()
    return Override(
        header.lower() if header else None,
        cookie,
        secret_header.lower() if secret_header else None,
        secret,
        tuple(cidrs),
        allow,
    )


def read_decision_headers(ctx: Ctx, data: object, path: str) -> DecisionHeaders:
    if data is None:
        return DecisionHeaders()
    sec = Section(ctx, data, path)
    base = DecisionHeaders()
    result = DecisionHeaders(sec.flag("reason_upstream", base.reason_upstream),
                             sec.flag("response", base.response))
    sec.close()
    return result
