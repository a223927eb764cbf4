"""What ``vlkit serve`` allows and limits: one dataclass the app, the image fetcher and the engine
read, filled from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlkit.errors import VlkitError


@dataclass
class ServeSettings:
    """Limits default to what a single-machine server can take safely; every rule is off only when
    a flag turns it off (no key: open API; no ``image_root``: no local paths; no remote images; no
    CORS origins)."""

    api_key: str | None = None
    image_root: Path | None = None
    allow_remote_images: bool = False
    allow_private_image_hosts: bool = False  # remote images from loopback, private or reserved addresses too
    cors_origins: tuple[str, ...] = ()
    max_tokens_cap: int = 512
    default_max_tokens: int = 256
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    max_n: int = 8
    remote_image_bytes: int = 10 * 2**20
    remote_timeout_s: float = 10.0
    max_batch: int = 16
    engine: str = "thread"  # "process": each chat model generates in a process of its own (vlkit serve's default)
    pin_engines: bool = False  # bind each engine process to CPUs of its own where some are spare (vlkit serve's default)

    def __post_init__(self):
        if self.image_root is not None:
            self.image_root = Path(self.image_root).resolve()
            if not self.image_root.is_dir():
                raise VlkitError(f"--image-root {self.image_root}: no such folder")
        if self.engine not in ("thread", "process"):
            raise VlkitError(f"engine={self.engine!r}; expected 'thread' or 'process'")
        for key in ("max_tokens_cap", "default_max_tokens", "max_body_bytes", "max_image_pixels", "max_images", "max_n",
                    "remote_image_bytes", "max_batch"):
            if getattr(self, key) < 1:
                raise VlkitError(f"{key}={getattr(self, key)}; expected 1 or more")
