"""Prompt tokenization for both front doors (gRPC and HTTP), off the event loop.

Tokenizing a long prompt takes milliseconds to tens of them: on the event loop it would
stall every stream. One thread, because a tokenizer is not safe to share between threads.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor


class PromptTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

    def tokenize(self, text: str, chat: bool) -> list[int]:
        """Text as it is, or wrapped as one user message in the chat template."""
        if chat:
            return self.chat([{"role": "user", "content": text}])
        return self.tokenizer(text).input_ids

    def chat(self, messages: list[dict]) -> list[int]:
        """Messages through the model's chat template, ready for the assistant's turn."""
        return list(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        )

    async def run(self, fn, *args):
        """`fn(*args)` on the tokenizer's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
