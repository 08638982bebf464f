"""The playground: a small page, served by connic itself, to chat with the configured agents.

The page is one jinja2 template (``connic/templates/playground.html``, autoescape
on) plus one script, one stylesheet and two vendored libraries (marked and
DOMPurify, ``connic/static/vendor/``) from ``connic/static/``: no external assets,
so it works offline. It lists the websocket connectors, takes a secret (from the
``#secret=`` fragment of the banner's link, which then connects by itself),
connects, and streams each agent's reply into a bubble of its own, rendered as
Markdown. See docs/playground.md.

Every URL the page uses is relative to the page itself (the assets under
``_playground/``, the connectors' WebSocket URLs computed from ``location``), so
it works under an embedding prefix and behind a proxy that strips one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import attrs
import jinja2
from aiohttp import web

from connic.transports.websocket import WebSocketTransport

if TYPE_CHECKING:
    from connic.app import Runtime

__all__ = [
    "ASSETS_DIR",
    "ConnectorInfo",
    "connectors",
    "html_environment",
    "install_playground",
    "page_link",
    "render_page",
]

log = logging.getLogger("connic.playground")

ASSETS_DIR = "_playground"
"""The folder, under the page's path, that serves the page's script and stylesheet."""

_ASSETS = {
    "playground.js": "text/javascript",
    "playground.css": "text/css",
    # The Markdown renderer and its sanitiser: see connic/static/vendor/README.md.
    "vendor/marked.umd.js": "text/javascript",
    "vendor/purify.min.js": "text/javascript",
}

# The page only ever talks to connectors of its own origin; everything it loads is its own.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
    ),
    "Cache-Control": "no-store",
    # ?secret= may be in the page's URL: never send it anywhere as a Referer.
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@attrs.frozen
class ConnectorInfo:
    """What the page is told about one websocket connector (never its secrets or agents)."""

    path: str
    """The connector's path as configured (relative to the connic application)."""
    url: str
    """The same path relative to the page's URL, e.g. ``ws`` or ``../ws``."""
    require_auth: bool


def html_environment() -> jinja2.Environment:
    """The jinja2 environment of connic's HTML pages: autoescape on, undefined names are errors."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("connic", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _relative(page_path: str, target: str) -> str:
    """``target`` (an absolute path) relative to the folder of ``page_path`` (which ends in ``/``)."""
    depth = page_path.count("/") - 1
    return "../" * depth + target.lstrip("/") or "./"


def connectors(runtime: Runtime, page_path: str = "/") -> list[ConnectorInfo]:
    """The websocket connectors of ``runtime``, as the page at ``page_path`` reaches them."""
    found = []
    for transport in runtime.transports:
        if isinstance(transport, WebSocketTransport):
            path = transport.connector.path
            found.append(ConnectorInfo(path, _relative(page_path, path), transport.options.require_auth))
    return found


def page_link(runtime: Runtime, url: str, generated: str | None) -> str:
    """The page's ``url`` with the fragment that makes the page connect by itself, if it can.

    ``#secret=...`` when the page's default connector (the first websocket one) takes the
    secret connic ``generated``, ``#connect`` when that connector needs no secret, else
    ``url`` unchanged: a secret the user chose is never printed. A fragment never reaches
    the server, a proxy or a log; the page removes it from the address bar once read.
    """
    first = next((t for t in runtime.transports if isinstance(t, WebSocketTransport)), None)
    if first is None:
        return url
    if not first.options.require_auth:
        return f"{url}#connect"
    if generated and generated in first.options.secrets:
        return f"{url}#secret={quote(generated, safe='')}"
    return url


def _asset(name: str) -> bytes:
    path = resources.files("connic") / "static"
    for part in name.split("/"):  # one part at a time: a zipped package's Traversable wants that
        path = path / part
    return path.read_bytes()


def render_page(runtime: Runtime, page_path: str = "/", *, assets_version: str = "") -> str:
    """The playground's HTML for ``runtime``, served at ``page_path``."""
    from connic import __version__  # connic/__init__.py imports this module's importer

    template = html_environment().get_template("playground.html")
    infos = connectors(runtime, page_path)
    return template.render(
        version=__version__,
        connectors=infos,
        config={"connectors": [attrs.asdict(c) for c in infos]},
        assets=ASSETS_DIR,
        assets_version=assets_version,
    )


def _static_handler(body: bytes, content_type: str) -> Handler:
    async def asset(request: web.Request) -> web.Response:
        response = web.Response(body=body, content_type=content_type, charset="utf-8")
        # The page links assets with ?v=<hash>: a new version is a new URL.
        response.headers["Cache-Control"] = "public, max-age=86400"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    return asset


def _page_handler(html: str) -> Handler:
    body = html.encode()

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS)

    return page


async def _to_page(request: web.Request) -> web.StreamResponse:
    # ".../connic" -> ".../connic/": a relative Location, right behind a prefix-stripping proxy too.
    last = request.path.rstrip("/").rsplit("/", 1)[-1]
    query = f"?{request.query_string}" if request.query_string else ""
    raise web.HTTPFound(f"{last}/{query}")


def install_playground(app: web.Application, runtime: Runtime, *, path: str = "/") -> bool:
    """Serve the playground at ``path`` of ``app`` (and its assets under ``path + '_playground/'``).

    ``path`` must end with ``/``. Returns False, and serves nothing, when a
    connector already uses ``path`` or the app has no websocket connector.
    """
    if not path.startswith("/") or not path.endswith("/"):
        raise ValueError(f"the playground's path must start and end with '/', got {path!r}")
    infos = connectors(runtime, path)
    if not infos:
        return False
    taken = {t.connector.path for t in runtime.transports}
    if path in taken or path.rstrip("/") in taken:
        log.warning("playground not served: connector path %r is where the page would be", path)
        return False
    digest = hashlib.sha256()
    bodies: dict[str, bytes] = {}
    for name in _ASSETS:
        bodies[name] = _asset(name)
        digest.update(bodies[name])
    html = render_page(runtime, path, assets_version=digest.hexdigest()[:12])
    routes: list[Any] = [web.get(path, _page_handler(html), name="connic-playground")]
    # A sub-application's "" becomes its prefix: "/connic" redirects to "/connic/".
    routes.append(web.get(path.rstrip("/"), _to_page))
    for name, content_type in _ASSETS.items():
        routes.append(web.get(f"{path}{ASSETS_DIR}/{name}", _static_handler(bodies[name], content_type)))
    app.router.add_routes(routes)
    return True
