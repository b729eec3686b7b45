"""The async transport of :class:`~tokenguard.backends.OpenAICompatible`: an aiohttp
session set up to behave as the sync path's httpx client does.

aiohttp rather than httpx's async client, which costs several times the CPU a request
(a gateway pays it on every call). What httpx does by default is done here too: the
proxy the environment names (``HTTPS_PROXY``, ``NO_PROXY``, ...), the same trust store
(certifi, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), credentials in the URL sent as Basic
auth, JSON without NaN, no redirect followed.
"""

from __future__ import annotations

import base64
import functools
import json
import urllib.request

import aiohttp
import httpx

from tokenguard.errors import ConfigError

__all__ = ["Target", "new_session"]


class Target:
    """Where a session posts: ``url`` without its credentials, which become a Basic
    Authorization header in place of any other (as httpx sends them)."""

    __slots__ = ("_basic", "url")

    def __init__(self, url: str) -> None:
        parsed = httpx.URL(url)
        self._basic: str | None = None
        if parsed.username or parsed.password:
            pair = f"{parsed.username}:{parsed.password}".encode()
            self._basic = "Basic " + base64.b64encode(pair).decode("ascii")
            parsed = parsed.copy_with(username=None, password=None)
        self.url = str(parsed)

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` as sent to :attr:`url`."""
        if self._basic is None:
            return headers
        kept = {name: value for name, value in headers.items() if name.lower() != "authorization"}
        return {**kept, "Authorization": self._basic}


def new_session(url: str, timeout: float | httpx.Timeout) -> aiohttp.ClientSession:
    """A session for requests to ``url``, made in the running event loop."""
    ssl = httpx.create_ssl_context() if httpx.URL(url).scheme == "https" else True
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl),
        timeout=_client_timeout(timeout),
        proxy=_env_proxy(url),
        json_serialize=functools.partial(json.dumps, allow_nan=False),  # as httpx: NaN is no JSON
    )


def _env_proxy(url: str) -> str | None:
    """The proxy named for ``url`` (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, or
    the system's settings on macOS and Windows; less ``NO_PROXY``, whose entries may
    name a port), as httpx's clients read it. Looked up once a session: aiohttp's own
    ``trust_env`` reads the environment and ``~/.netrc`` again on every request, which
    costs more than the request."""
    parsed = httpx.URL(url)
    where = f"{parsed.host}:{parsed.port}" if parsed.port else parsed.host
    if urllib.request.proxy_bypass_environment(where):  # type: ignore[attr-defined]  # untyped, not private
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and "://" not in proxy:
        proxy = f"http://{proxy}"  # as httpx reads "host:3128"
    if proxy and not proxy.lower().startswith(("http://", "https://")):
        raise ConfigError(f"the environment names the proxy {proxy.split('@')[-1]!r} for {parsed.host}: "
                          "async calls go through http:// proxies only (not SOCKS); set NO_PROXY or "
                          "HTTPS_PROXY to an HTTP proxy")
    return proxy


def _client_timeout(timeout: float | httpx.Timeout) -> aiohttp.ClientTimeout:
    """``timeout`` in aiohttp's terms. httpx's connect and read limits are aiohttp's
    sock_connect and sock_read; aiohttp's connect bounds the wait for a pooled
    connection and the connecting together, so it gets httpx's pool and connect
    limits summed. (aiohttp has no write limit: a write waits within the read's.)"""
    if not isinstance(timeout, httpx.Timeout):
        return aiohttp.ClientTimeout(total=None, connect=2 * timeout, sock_connect=timeout, sock_read=timeout)
    pool, connect = timeout.pool, timeout.connect
    both = None if pool is None or connect is None else pool + connect
    return aiohttp.ClientTimeout(total=None, connect=both, sock_connect=connect, sock_read=timeout.read)
