"""The one seam for outgoing HTTP to user-supplied URLs (alert webhooks today).

A user-supplied URL must never reach this installation's own network (SSRF): the cloud metadata service
(169.254.169.254), Redis, PostgreSQL, Docker's API, the engines or the admin on loopback. So:

- `url_check` (when the URL is saved) refuses other schemes than http/https, ports other than 80, 443 and
  1024–65535, credentials in the URL, and any host name that resolves to a loopback, private, link-local,
  multicast, reserved, shared (100.64/10) or unspecified address, IPv4 or IPv6 (IPv4-mapped, 6to4, Teredo
  and NAT64 addresses are judged by the IPv4 address they carry). Every address a name resolves to must pass.
- `post_json` (when sending) does it all again: it resolves the name once, checks every address and then
  connects to a checked address itself (the URL's host replaced by the IP; `Host` header and TLS SNI and
  certificate verification keep the name), so a name that resolves elsewhere a second time (DNS rebinding)
  changes nothing. No redirect is followed (a 3xx is a failure), no proxy from the environment is used,
  one deadline bounds the whole delivery (resolving, connecting, sending, the status and the body: a
  trickling endpoint cannot hold a worker longer) and at most `max_bytes` of the answer are read.

Errors are `OutboundError` whose message is generic and safe to show to the user ("timed out",
"connection refused", "HTTP 500", "address not allowed"); details go to the log only.
`LLMHUB_WEBHOOK_ALLOW_PRIVATE=1` (settings.WEBHOOK_ALLOW_PRIVATE) lets an on-premises operator allow
internal targets (the scheme, port and deadline rules still hold).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import certifi
import httpx
from django.conf import settings

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024
ALLOWED_SCHEMES = {"http": 80, "https": 443}
NAT64 = ipaddress.ip_network("64:ff9b::/96")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class OutboundError(Exception):
    """A delivery or URL refused or failed; `str(exc)` is a generic message safe to show to the user."""


class AddressNotAllowed(OutboundError):
    """The URL's scheme, port or (resolved) address is not one LLMHub may send to."""


@dataclass(frozen=True)
class Response:
    """What came back: `status` (HTTP status code), up to `max_bytes` of the `body`, `truncated` when more
    was sent than was read."""

    status: int
    body: bytes
    truncated: bool

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def resolve(host: str, port: int) -> list[str]:
    """The addresses (text) `host` resolves to, via the system resolver. Raises OSError when it does not.

    Tests replace this function to make a name resolve where they want (e.g. differently on the second call).
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def address_problem(address: IpAddress) -> str | None:
    """Why `address` may not be sent to ("a loopback address", "a private address", ...), None when it may.

    IPv4-mapped (::ffff:a.b.c.d), 6to4 (2002::/16), Teredo and NAT64 (64:ff9b::/96) IPv6 addresses are judged
    by the IPv4 address they embed as well. Sources: Python's `ipaddress` (IANA special-purpose registries).
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour]
        if address.teredo:
            embedded += list(address.teredo)
        if address in NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        for inner in filter(None, embedded):
            if problem := address_problem(inner):
                return problem
    checks = (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    )
    for attribute, problem in checks:
        if getattr(address, attribute):
            return problem
    if not address.is_global:
        return "a non-public address"
    return None


def _allow_private() -> bool:
    return bool(getattr(settings, "WEBHOOK_ALLOW_PRIVATE", False))


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # name or IP literal, without brackets
    port: int
    url: str


def _parse(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise AddressNotAllowed("the URL is not valid") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise AddressNotAllowed("only http:// and https:// URLs are allowed")
    if parts.username is not None or parts.password is not None:
        raise AddressNotAllowed("the URL must not contain a user name or password")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise AddressNotAllowed("the URL has no host")
    port = port or ALLOWED_SCHEMES[scheme]
    if port not in ALLOWED_SCHEMES.values() and not 1024 <= port <= 65535:
        raise AddressNotAllowed(f"port {port} is not allowed (use 80, 443 or 1024–65535)")
    return _Target(scheme=scheme, host=host, port=port, url=url)


def _literal(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _checked_addresses(target: _Target, addresses: list[str]) -> list[IpAddress]:
    """Every address parsed and checked; raises AddressNotAllowed naming the first problem found."""
    checked = []
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
        if not _allow_private() and (problem := address_problem(address)):
            log.info("outbound: %s refused, it resolves to %s (%s)", target.host, address, problem)
            what = f"{target.host} is" if _literal(target.host) else f"{target.host} resolves to"
            raise AddressNotAllowed(f"address not allowed: {what} {problem}; use a public address")
        checked.append(address)
    if not checked:
        raise OutboundError("could not resolve host")
    return checked


def url_check(url: str) -> None:
    """Check a user-supplied URL when it is saved: scheme, port and every address its host resolves to.

    Raises AddressNotAllowed with a message naming why (shown as a form error), OutboundError("could not
    resolve host") when the name does not resolve. The same checks run again on every send.
    """
    target = _parse(url)
    if (literal := _literal(target.host)) is not None:
        _checked_addresses(target, [str(literal)])
        return
    try:
        addresses = resolve(target.host, target.port)
    except (OSError, UnicodeError):
        raise OutboundError(f"could not resolve host {target.host}") from None
    _checked_addresses(target, addresses)


def _ssl_context() -> ssl.SSLContext:
    """Certificate and host name verification against Mozilla's CA bundle (certifi)."""
    return ssl.create_default_context(cafile=certifi.where())


async def _resolve_async(target: _Target) -> list[IpAddress]:
    if (literal := _literal(target.host)) is not None:
        return _checked_addresses(target, [str(literal)])
    try:
        addresses = await asyncio.to_thread(resolve, target.host, target.port)
    except (OSError, UnicodeError):
        raise OutboundError("could not resolve host") from None
    return _checked_addresses(target, addresses)


def _pinned_url(target: _Target, address: IpAddress) -> str:
    """The URL with its host replaced by `address` (brackets for IPv6)."""
    parts = urlsplit(target.url)
    host = f"[{address}]" if address.version == 6 else str(address)
    return urlunsplit((target.scheme, f"{host}:{target.port}", parts.path or "/", parts.query, ""))


def _host_header(target: _Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == ALLOWED_SCHEMES[target.scheme] else f"{host}:{target.port}"


async def _post(target: _Target, content: bytes, headers: dict[str, str], max_bytes: int) -> Response:
    addresses = await _resolve_async(target)
    extensions = {}
    if target.scheme == "https" and _literal(target.host) is None:
        extensions["sni_hostname"] = target.host  # TLS verifies the certificate for the name, not the IP
    last_error: Exception | None = None
    async with httpx.AsyncClient(verify=_ssl_context(), trust_env=False, follow_redirects=False) as client:
        for address in addresses:
            request = client.build_request(
                "POST", _pinned_url(target, address), content=content,
                headers={**headers, "Host": _host_header(target)}, extensions=extensions,
            )  # fmt: skip
            try:
                response = await client.send(request, stream=True)
            except httpx.ConnectError as exc:
                last_error = exc
                continue  # try the next checked address
            try:
                body = bytearray()
                truncated = False
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > max_bytes:
                        truncated = True
                        del body[max_bytes:]
                        break
                return Response(status=response.status_code, body=bytes(body), truncated=truncated)
            finally:
                await response.aclose()
    raise last_error or OutboundError("connection failed")


def _generic(exc: BaseException) -> OutboundError:
    """A user-safe message for a transport failure."""
    if isinstance(exc, OutboundError):
        return exc
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return OutboundError("timed out")
    chain, cause = [], exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
        if isinstance(cause, BaseExceptionGroup):
            cause = cause.exceptions[0]
    text = " ".join(str(e) for e in chain).lower()
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return OutboundError("connection refused")
    if isinstance(exc, httpx.ConnectError):
        if "certificate" in text or "ssl" in text or "tls" in text:
            return OutboundError("TLS error: the certificate could not be verified")
        if "refused" in text:
            return OutboundError("connection refused")
        return OutboundError("connection failed")
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return OutboundError("connection closed unexpectedly")
    return OutboundError("delivery failed")


def post_json(
    url: str,
    *,
    content: bytes,
    headers: dict[str, str] | None = None,
    deadline: float,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Response:
    """POST `content` (JSON bytes) to the user-supplied `url`, with every check in this module's docstring.

    `deadline`: seconds for the whole delivery (resolve, connect, send, read the status and up to
    `max_bytes` of the body). Returns the Response whatever its status (a 3xx is returned, not followed).
    Raises OutboundError (AddressNotAllowed for a refused target) with a generic message; the details
    are logged. Call it from synchronous code (a Celery task), not from inside an event loop.
    """
    target = _parse(url)  # the URL itself is never logged: webhook URLs often carry a secret
    all_headers = {"Content-Type": "application/json", "User-Agent": "LLMHub", **(headers or {})}

    async def run() -> Response:
        async with asyncio.timeout(deadline):
            return await _post(target, content, all_headers, max_bytes)

    try:
        return asyncio.run(run())
    except Exception as exc:  # noqa: BLE001 - every failure becomes a generic message
        error = _generic(exc)
        log.warning(
            "outbound POST to %s failed: %s: %s (shown as %r)", target.host, exc.__class__.__name__, exc, str(error)
        )
        raise error from exc
