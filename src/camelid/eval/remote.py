"""Scoring through a running ``camelid serve``: the engine's scoring interface over HTTP.

:class:`ServerScorer` offers what the task runners use of an :class:`camelid.Engine` —
``tokenizer``, ``max_seq_len``, ``max_batch_size``, ``score_batch`` and ``generate`` — by
OpenAI completions requests: likelihoods as token-id prompts with ``echo`` and ``logprobs``
and ``max_tokens: 0`` (so the server tokenises nothing: the ids are the ones scored in
process), generation as text prompts with the same stop strings, greedy. The tokenizer is the
local model's, and the server must serve the same weights (its ``/v1/models`` digest).
Requests go out several at a time (``concurrency``), as an evaluation harness sends them.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from camelid.eval.tasks import EvalError
from camelid.infer.engine import TokenLogprob
from camelid.infer.sampling import SamplingParams
from camelid.tokenizer import Tokenizer


@dataclass
class RemoteCompletion:
    text: str
    finish_reason: str


class ServerScorer:
    def __init__(
        self,
        url: str,
        tokenizer: Tokenizer,
        *,
        api_key: str | None = None,
        concurrency: int = 4,
        timeout_s: float = 600.0,
    ) -> None:
        self.base = url.rstrip("/").removesuffix("/v1")
        self.tokenizer = tokenizer
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        models = self._request("GET", "/v1/models")
        try:
            card = models["data"][0]
            self.model_name = card["id"]
            self.max_seq_len = int(card["max_model_len"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise EvalError(f"{self.base}/v1/models: not a camelid server's answer") from None
        self.digest = card.get("digest")
        self.tokenizer_digest = card.get("tokenizer_digest")
        self.max_batch_size = 16
        self.device, self.dtype = "server", card.get("dtype", "")

    # ------------------------------------------------------------------------------- http
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise EvalError(f"{self.base}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise EvalError(f"{self.base}{path}: cannot reach the server ({e})") from None

    def _map(self, fn, jobs: list) -> list:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, jobs))

    # ------------------------------------------------------------------------- the engine's
    def score_batch(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int], *, batch_tokens: int = 0
    ) -> list[list[TokenLogprob]]:
        def one(job: tuple[Sequence[int], int]) -> list[TokenLogprob]:
            seq, start = job
            body = {"model": self.model_name, "prompt": list(seq), "max_tokens": 0,
                    "echo": True, "logprobs": 1, "temperature": 0}  # fmt: skip
            lp = self._request("POST", "/v1/completions", body)["choices"][0]["logprobs"]
            out = []
            for pos in range(start, len(seq)):
                chosen = lp["token_logprobs"][pos]
                top = lp["top_logprobs"][pos] or {}
                best = max(top.values(), default=chosen)
                out.append(TokenLogprob(seq[pos], chosen, 1 if chosen >= best else 2))
            return out

        return self._map(one, list(zip(sequences, starts, strict=True)))

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[RemoteCompletion]:
        def one(prompt: str) -> RemoteCompletion:
            body = {"model": self.model_name, "prompt": prompt,
                    "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                    "top_p": params.top_p, "stop": list(params.stop) or None}  # fmt: skip
            if params.seed is not None:
                body["seed"] = params.seed
            choice = self._request("POST", "/v1/completions", body)["choices"][0]
            return RemoteCompletion(choice["text"], choice["finish_reason"])

        return self._map(one, list(prompts))
