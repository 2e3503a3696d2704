"""Remote reward servers over JSON (DeQA, UnifiedReward, or any model kept in its own environment).

flow_grpo talks to its reward servers with pickled request and response bodies (Flow-OPD `flow_grpo/rewards.py:
213-217`): unpickling a response runs whatever the server sent. This client sends and reads JSON only:

    POST <url>   {"images": ["<base64 PNG>", ...], "prompts": [...], "metadata": [{...}, ...]}
    200          {"scores": [float, ...]}          one finite number per image, in order

Batches of 64 images per request and a 120 s timeout, as flow_grpo (rewards.py:184, 216); a refused connection,
a timeout or a 5xx is retried 3 times (1 s, 2 s, 4 s apart), anything else fails at once naming the URL. Scores
are returned as the server gives them (DeQA: 1-5, the card divides by 5 in its average).
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

import numpy as np
import torch

from engine.eval.scorers import register_scorer
from engine.eval.scorers.base import BaseScorer, Metadata, ScorerError, batches, to_pil

BATCH = 64
TIMEOUT_S = 120.0
RETRIES = 3


def png_base64(images: torch.Tensor) -> list[str]:
    """[B, 3, H, W] in [0, 1] -> base64 PNG strings (lossless, uint8 as `to_pil`)."""
    out = []
    for img in to_pil(images):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


class ServerScorer(BaseScorer):
    """Scores from a JSON-over-HTTP reward server at `url`."""

    def __init__(self, name: str, url: str, timeout: float = TIMEOUT_S, batch: int = BATCH,
                 retries: int = RETRIES):
        if not url.startswith(("http://", "https://")):
            raise ScorerError(f"scorer {name!r}: expected the server's http:// or https:// URL, got {url!r}")
        self.name, self.url, self.timeout, self.batch, self.retries = name, url, timeout, batch, retries

    def _post(self, body: bytes) -> dict:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:200].decode(errors="replace")
                if exc.code < 500 or attempt == self.retries:
                    raise ScorerError(f"scorer {self.name!r}: {self.url} answered {exc.code}: {detail}") from exc
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt == self.retries:
                    raise ScorerError(f"scorer {self.name!r}: no answer from {self.url} after {self.retries + 1} "
                                      f"tries: {exc}") from exc
            time.sleep(2.0 ** attempt)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ScorerError(f"scorer {self.name!r}: {self.url} did not answer JSON: {raw[:100]!r}") from exc
        if not isinstance(data, dict):
            raise ScorerError(f"scorer {self.name!r}: {self.url} answered {type(data).__name__}, expected an object "
                              f"with 'scores'")
        return data

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Metadata]) -> np.ndarray:
        """[B] scores from the server, batch by batch."""
        out: list[float] = []
        for s in batches(len(prompts), self.batch):
            body = json.dumps({"images": png_base64(images[s]), "prompts": list(prompts[s]),
                               "metadata": [dict(m) for m in metadata[s]]}).encode()
            scores = self._post(body).get("scores")
            n = s.stop - s.start
            if (not isinstance(scores, list) or len(scores) != n
                    or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                               for v in scores)):
                raise ScorerError(f"scorer {self.name!r}: {self.url} must answer {{'scores': [{n} finite numbers]}}, "
                                  f"got {str(scores)[:100]}")
            out += [float(v) for v in scores]
        return np.array(out, dtype=np.float64)


register_scorer("deqa", lambda url, device: ServerScorer("deqa", url), weights="url")
register_scorer("unifiedreward", lambda url, device: ServerScorer("unifiedreward", url), weights="url")
