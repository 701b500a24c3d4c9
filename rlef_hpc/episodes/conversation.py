"""A conversation kept as the exact token sequence the policy saw and produced.

Re-tokenising a multi-turn chat after the fact drifts (a sampled response is rarely the
tokenizer's own encoding of its text), so PPO would train on tokens the policy never sampled.
Here the sequence only ever grows: sampled responses are appended as sampled, and each new user
message is rendered by the tokenizer's chat template as the text it adds after what is already
there (the template must render conversations so that each is a prefix of its continuation).
"""

from __future__ import annotations

from typing import Any


class TemplateError(ValueError):
    pass


class Conversation:
    def __init__(self, tokenizer: Any, system: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.messages: list[dict[str, str]] = []
        if system is not None:
            self.messages.append({"role": "system", "content": system})
        self.tokens: list[int] = []
        self.end_of_turn = list(tokenizer.encode(tokenizer.eos_token, add_special_tokens=False))

    def _render(self, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=generation_prompt, tokenize=False
        )

    def add_user(self, content: str) -> tuple[int, int]:
        """Appends a user message and the assistant's generation prompt; returns the span of
        tokens added (the prompt of the next turn ends there)."""
        before = self._render(False) if self.messages else ""
        self.messages.append({"role": "user", "content": content})
        after = self._render(True)
        if not after.startswith(before):
            raise TemplateError(
                "the chat template renders a conversation differently once it continues; "
                "turn-by-turn token sequences need a prefix-stable template"
            )
        start = len(self.tokens)
        if self.messages[-2:-1] and self.messages[-2]["role"] == "assistant":
            # The template closes the assistant's turn; a response cut short (no end-of-turn
            # token sampled) is closed here, as part of the prompt, not of the response.
            if self.tokens[-len(self.end_of_turn) :] != self.end_of_turn:
                self.tokens += self.end_of_turn
        self.tokens += self.tokenizer.encode(after[len(before) :], add_special_tokens=False)
        return start, len(self.tokens)

    def add_response(self, tokens: list[int]) -> tuple[int, int, str]:
        """Appends the sampled response tokens as they are; returns their span and text."""
        start = len(self.tokens)
        self.tokens += tokens
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text})
        return start, len(self.tokens), text

    def retokenizes(self) -> bool:
        """Whether decoding the token sequence gives back the template's text of the chat."""
        rendered = self._render(self.messages[-1]["role"] == "user")
        decoded = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        if self.messages[-1]["role"] == "assistant" and not decoded.endswith(
            self.tokenizer.eos_token
        ):
            decoded += self.tokenizer.eos_token
        return decoded == rendered
