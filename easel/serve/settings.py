"""The server's settings: what `easel serve` flags set (kept free of FastAPI so `easel --help` stays fast)."""
from __future__ import annotations

from dataclasses import dataclass, field

TOKEN_COOKIE = "easel_token"  # where POST /api/v1/session keeps the bearer token (HttpOnly, SameSite=Strict)
MEMORY_FRACTION = 0.9  # of the memory available when the server starts: the default --max-memory


@dataclass
class Settings:
    """What `easel serve` flags set: where to listen, which model, limits, auth and CORS."""

    host: str = "127.0.0.1"
    port: int = 7860
    model: str | None = None  # path or registry name (trusted: it comes from whoever starts the server)
    dtype: str = "fp32"
    device: str = "cpu"
    max_queue: int = 16
    max_pixels: int = 2048 * 2048  # of the largest image a request makes (hires and outpaint included)
    max_steps: int = 150
    max_batch: int = 16  # batch_size x n_iter
    max_input_pixels: int | None = None  # of each init image / mask (read from the header); None: 4 x max_pixels
    max_memory_bytes: int | None = None  # estimated peak per request; None: MEMORY_FRACTION of what is available
    max_body_bytes: int = 64 * 2**20
    api_auth: str | None = None  # "user:pass" (several separated by commas)
    token: str | None = None  # bearer token
    cors_origins: list[str] = field(default_factory=list)
    keep_finished: int = 200  # finished jobs (with their images) kept in memory
    output_dir: str | None = None  # where routes that save images (A1111's save_images) write; None: ./outputs
    train_root: str | None = None  # training jobs read dataset folders under it only; None: training is off
    max_train_steps: int = 5000  # of one training job

    def input_pixels(self) -> int:
        """The pixel limit of each input image: max_input_pixels, else four times max_pixels (an init image is
        usually larger than the output it is resized to)."""
        return self.max_input_pixels if self.max_input_pixels is not None else 4 * self.max_pixels

    def credentials(self) -> list[tuple[str, str]]:
        """(user, password) pairs of api_auth; ValueError if one has no ':'."""
        pairs = []
        for item in filter(None, (s.strip() for s in (self.api_auth or "").split(","))):
            if ":" not in item:
                raise ValueError(f"--api-auth takes user:password (got {item.split(':')[0]!r} without a ':')")
            pairs.append(tuple(item.split(":", 1)))
        return pairs
