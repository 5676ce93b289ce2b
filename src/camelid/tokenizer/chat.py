"""The Llama chat format, defined once and emitted two ways: as pieces camelid tokenizes itself
(so message text can never turn into control tokens), and as the Jinja template other tools
read from ``tokenizer_config.json``. Both give the same ids for the same conversation.

Llama 3 (the plain 3.0 form; Llama 4 is the same with its own header and turn-end names)::

    <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content, trimmed}<|eot_id|>...
    <|start_header_id|>assistant<|end_header_id|>\\n\\n        (the generation prompt)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from camelid.errors import TokenizerError
from camelid.tokenizer.bpe import BOS


@dataclass(frozen=True)
class ChatFormat:
    """The three control tokens that frame a message."""

    header_start: str
    header_end: str
    eot: str

    def jinja(self) -> str:
        """The format as a Hugging Face chat template (``bos_token`` is the tokenizer's BOS)."""
        head, end, eot = self.header_start, self.header_end, self.eot
        return (
            "{{ bos_token }}"
            "{% for message in messages %}"
            f"{{{{ '{head}' + message['role'] + '{end}\\n\\n'"
            f" + (message['content'] | trim) + '{eot}' }}}}"
            "{% endfor %}"
            "{% if add_generation_prompt %}"
            f"{{{{ '{head}assistant{end}\\n\\n' }}}}"
            "{% endif %}"
        )


LLAMA3_CHAT = ChatFormat("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA4_CHAT = ChatFormat("<|header_start|>", "<|header_end|>", "<|eot|>")


def find_chat_format(special_tokens: Mapping[str, int]) -> ChatFormat | None:
    """The format whose control tokens this vocabulary has, if any."""
    for fmt in (LLAMA3_CHAT, LLAMA4_CHAT):
        if {fmt.header_start, fmt.header_end, fmt.eot} <= special_tokens.keys():
            return fmt
    return None


@dataclass(frozen=True)
class Piece:
    """A run of the rendered conversation: a control token or plain text.

    ``trained`` marks what a fine-tune learns to produce: assistant content and its turn end.
    """

    text: str
    special: bool = False
    trained: bool = False


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise TokenizerError(
            f"chat messages must be a list of dicts, got {type(messages).__name__}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"chat message {i} must be a dict, got {type(m).__name__}")
        for field in ("role", "content"):
            if not isinstance(m.get(field), str):
                got = "missing" if field not in m else type(m[field]).__name__
                raise TokenizerError(f"chat message {i}: '{field}' must be a string ({got})")


def chat_pieces(
    fmt: ChatFormat, messages: list[dict], add_generation_prompt: bool = False
) -> list[Piece]:
    """The conversation as pieces, in order; joining their text gives the rendered chat."""
    check_messages(messages)
    pieces = [Piece(BOS, special=True)]

    def header(role: str) -> None:
        pieces.extend(
            [Piece(fmt.header_start, True), Piece(role), Piece(fmt.header_end, True), Piece("\n\n")]
        )

    for m in messages:
        header(m["role"])
        trained = m["role"] == "assistant"
        pieces.append(Piece(m["content"].strip(), trained=trained))
        pieces.append(Piece(fmt.eot, special=True, trained=trained))
    if add_generation_prompt:
        header("assistant")
    return pieces
