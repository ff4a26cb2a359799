"""Prompt token ids for routing, computed off the event loop.

The router tokenizes a request the way the replicas will (same tokenizer, loaded once at
start, chat template included) only to match its prefix; the replica still receives the
original body. Tokenizing and hashing run on the router's own single worker thread. A prompt
the router cannot read (bad input, no tokenizer for text) routes without prefix knowledge and
the replica answers it, errors included.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from kvloom.api.router_index import PromptPages

log = logging.getLogger(__name__)


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


class PromptTokenizer:
    def __init__(self, model: Optional[str]):
        self.model = model  # a checkpoint directory or .gguf whose tokenizer the replicas use; None: ids only
        self.tokenizer = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-tokenize")

    async def load(self) -> None:
        if self.model is None:
            return
        from kvloom.engine.models.loader import resolve_source
        from kvloom.engine.tokenizer import Tokenizer

        loop = asyncio.get_running_loop()
        self.tokenizer = await loop.run_in_executor(self._executor,
                                                    lambda: Tokenizer.load(resolve_source(self.model)))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def prompt_pages(self, path: str, body: dict, page_sizes: Sequence[int]) -> Optional[PromptPages]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._prompt_pages, path, body, tuple(page_sizes))

    def _prompt_pages(self, path: str, body: dict, page_sizes: tuple) -> Optional[PromptPages]:
        try:
            ids = self._token_ids(path, body)
        except Exception as exc:  # noqa: BLE001 - the replica validates and answers the request
            log.debug("cannot tokenize for routing: %s", exc)
            return None
        return PromptPages(ids).precompute(page_sizes) if ids else None

    def _token_ids(self, path: str, body: dict) -> Optional[list[int]]:
        if path.endswith("/chat/completions"):
            messages = body.get("messages")
            return self.tokenizer.apply_chat_template(messages) if self.tokenizer and messages else None
        prompt = body.get("query") if path.endswith("/score") else body.get("prompt")
        if isinstance(prompt, list) and prompt and not _is_ids(prompt):
            prompt = prompt[0]  # a batch of prompts routes by its first
        if _is_ids(prompt):
            return list(prompt)
        if isinstance(prompt, str) and self.tokenizer is not None:
            return self.tokenizer.encode(prompt)
        return None
