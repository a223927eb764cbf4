"""Images named by a request's ``image_url``, fetched under the server's rules: ``data:`` URLs
always; local paths (``/abs/x.png``, ``photos/x.png`` or ``file://...``) only inside
``--image-root`` (symbolic links resolved first, so none leads out); ``http(s)`` URLs only with
``--allow-remote-images``, bounded in bytes and seconds, and not from the server's own network
(loopback, private, link-local and other reserved addresses, as the host name resolves, are refused
unless ``--allow-private-image-hosts``: a request must not make the server read its neighbours; the
fetch then connects to the address that was checked, so a name that resolves elsewhere the second
time, DNS rebinding, cannot lead it back in).
Every image is checked against the pixel limit from its header before a pixel is decoded
(decompression bombs are refused: 413)."""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import socket
import time
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from vlkit.data.images import BadSample, decode_image
from vlkit.serve.errors import ApiError
from vlkit.serve.settings import ServeSettings


class ImageFetcher:
    """``fetch(url, where)`` → an RGB PIL image, or an :class:`ApiError` naming ``where`` (the
    message part) and the rule that refused it."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings

    def fetch(self, url: str, where: str) -> Image.Image:
        scheme = urlparse(url).scheme.lower() if ":" in url[:12] else ""
        if scheme == "data":
            data = data_url_bytes(url, where)
        elif scheme in ("http", "https"):
            data = self._remote(url, where)
        elif scheme in ("", "file"):
            data = self._local(unquote(urlparse(url).path) if scheme == "file" else url, where)
        else:
            raise ApiError(400, f"{where}: unsupported image URL scheme {scheme!r}; expected data:, a path under "
                           "--image-root, or http(s) (with --allow-remote-images)", "invalid_image_url", _field(where))
        return self.decode(data, where)

    def decode(self, data: bytes, where: str) -> Image.Image:
        """The image in ``data``, after its header's size passes the pixel limit."""
        limit = self.settings.max_image_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    w, h = img.size
        except Image.DecompressionBombError:
            w = h = None
        except Exception as err:  # noqa: BLE001 - untrusted bytes: any failure means "not an image"
            raise ApiError(400, f"{where}: not an image ({type(err).__name__}: {err})", "invalid_image", _field(where)) from None
        if w is None or w * h > limit:
            size = "too many pixels" if w is None else f"{w}x{h} = {w * h} pixels"
            raise ApiError(413, f"{where}: {size}; the server takes images of at most {limit} pixels", "image_too_large",
                           _field(where))
        try:
            return decode_image(data, where, max_pixels=limit)
        except BadSample as err:
            raise ApiError(400, str(err), "invalid_image", _field(where)) from None

    def _local(self, path: str, where: str) -> bytes:
        root = self.settings.image_root
        if root is None:
            raise ApiError(400, f"{where}: local image paths are not served; start the server with --image-root FOLDER "
                           "to allow the images under it (or send a data: URL)", "image_path_not_allowed", _field(where))
        try:
            target = (root / path).resolve()
        except (OSError, RuntimeError, ValueError) as err:  # ValueError: a NUL byte in the path
            raise ApiError(400, f"{where}: bad path {path!r} ({err})", "image_path_not_allowed", _field(where)) from None
        if not target.is_relative_to(root):
            raise ApiError(400, f"{where}: {path!r} is outside the image root; only images under --image-root are served",
                           "image_path_not_allowed", _field(where))
        if not target.is_file():
            raise ApiError(400, f"{where}: {path!r}: no such image under the image root", "image_not_found", _field(where))
        size = target.stat().st_size
        if size > self.settings.remote_image_bytes:
            raise ApiError(413, f"{where}: {path!r} is {size} bytes; the server reads images of at most "
                           f"{self.settings.remote_image_bytes} bytes", "image_too_large", _field(where))
        return Path(target).read_bytes()

    def _remote(self, url: str, where: str) -> bytes:
        if not self.settings.allow_remote_images:
            raise ApiError(400, f"{where}: the server fetches no URLs; send the image as a data: URL (or start the "
                           "server with --allow-remote-images)", "remote_images_disabled", _field(where))
        import httpx

        target, headers, extensions = (url, {}, {}) if self.settings.allow_private_image_hosts else _pinned(url, where)
        limit, timeout = self.settings.remote_image_bytes, self.settings.remote_timeout_s
        deadline = time.monotonic() + timeout  # for the whole fetch: httpx's timeout bounds each read alone
        try:
            with httpx.Client(timeout=timeout, follow_redirects=False) as client, \
                    client.stream("GET", target, headers=headers, extensions=extensions) as r:
                if r.status_code != 200:
                    raise ApiError(400, f"{where}: fetching {url} answered HTTP {r.status_code}; expected 200",
                                   "image_fetch_failed", _field(where))
                declared = int(r.headers.get("content-length") or 0)
                if declared > limit:
                    raise ApiError(413, f"{where}: {url} is {declared} bytes; the limit is {limit}", "image_too_large",
                                   _field(where))
                data = bytearray()
                for piece in r.iter_bytes():
                    data += piece
                    if len(data) > limit:
                        raise ApiError(413, f"{where}: {url} is over {limit} bytes, the limit", "image_too_large",
                                       _field(where))
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("the whole fetch took too long")
                return bytes(data)
        except httpx.TimeoutException:
            raise ApiError(400, f"{where}: fetching {url} took over {timeout} s, the limit", "image_fetch_timeout",
                           _field(where)) from None
        except httpx.HTTPError as err:
            raise ApiError(400, f"{where}: cannot fetch {url} ({type(err).__name__}: {err})", "image_fetch_failed",
                           _field(where)) from None


def _pinned(url: str, where: str) -> tuple[str, dict, dict]:
    """``url`` with its host replaced by the one address it is fetched from, and the ``Host`` header
    and TLS name (httpcore's ``sni_hostname``, which the certificate is checked against) of the
    original; refused when the host is, or resolves to, an address of the server's own networks.
    Resolving once and connecting to that address leaves no second lookup to rebind."""
    parts = urlparse(url)
    host = parts.hostname or ""
    try:
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, parts.port or None, type=socket.SOCK_STREAM)})
    except (OSError, UnicodeError, ValueError) as err:  # ValueError: a port out of range
        raise ApiError(400, f"{where}: cannot resolve the host of {url} ({err})", "image_fetch_failed", _field(where)) from None
    ips = [ipaddress.ip_address(a.split("%")[0]) for a in addresses]
    for ip in ips:
        if not ip.is_global:
            raise ApiError(400, f"{where}: {url} is on a private, loopback or reserved address ({ip}); the server fetches "
                           "from public hosts only (--allow-private-image-hosts allows others)", "image_host_not_allowed",
                           _field(where))  # fmt: skip
    if not ips:
        raise ApiError(400, f"{where}: the host of {url} resolves to no address", "image_fetch_failed", _field(where))
    address = f"[{ips[0]}]" if ips[0].version == 6 else str(ips[0])
    port = f":{parts.port}" if parts.port else ""
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@{address}{port}" if user else f"{address}{port}"
    name = f"[{host}]" if ":" in host else host
    extensions = {"sni_hostname": host} if parts.scheme.lower() == "https" else {}
    return parts._replace(netloc=netloc).geturl(), {"Host": f"{name}{port}"}, extensions


def _field(where: str) -> str:
    """The request field an error names: ``input`` for ``input[2]``, ``messages`` for ``messages[0].content[1]``."""
    return re.split(r"[\[.]", where, maxsplit=1)[0] or "messages"


def data_url_bytes(url: str, where: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL (or an :class:`ApiError` saying what is wrong)."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise ApiError(400, f"{where}: a data: URL without a comma; expected data:image/png;base64,<data>",
                       "invalid_image_url", _field(where))
    media = head[5:].split(";")
    if media[0] and not media[0].lower().startswith("image/"):
        raise ApiError(400, f"{where}: a data: URL of type {media[0]!r}; expected an image type (image/png, ...)",
                       "invalid_image", _field(where))
    if "base64" not in (m.lower() for m in media[1:]):
        return unquote(payload).encode("latin-1", "replace")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, f"{where}: the data: URL's base64 does not decode ({err})", "invalid_image_url",
                       _field(where)) from None
