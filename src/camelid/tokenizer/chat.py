"""The Llama chat format, defined once and emitted two ways: as pieces camelid tokenizes itself
(so message text can never turn into control tokens), and as the Jinja template other tools
read from ``tokenizer_config.json``. Both give the same ids for the same conversation (but see
Llama 4 below). Also here: the prompt for a chat's next turn, and fitting a long history into
a fixed context.

Llama 3 (the plain 3.0 form, as its Hugging Face template writes it)::

    <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content, trimmed}<|eot_id|>...
    <|start_header_id|>assistant<|end_header_id|>\\n\\n        (the generation prompt)

Llama 4, as Meta's reference ``ChatFormat`` (llama-models 0.3.0, llama_models/llama4/
chat_format.py) encodes it: the same shape with its own names, and the content *not* trimmed::

    <|begin_of_text|><|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>...
    <|header_start|>assistant<|header_end|>\\n\\n

Meta encodes each part on its own (role, ``"\\n\\n"``, content); the pieces here do too. The
Jinja template is tokenized as one string, so for Llama 4 content that starts with a newline
(``"\\n\\n"`` then ``"\\nx"`` merge into one newline token) it gives other ids than Meta.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from camelid.errors import TokenizerError
from camelid.tokenizer.bpe import BOS

if TYPE_CHECKING:
    from camelid.tokenizer.tokenizer import Tokenizer


@dataclass(frozen=True)
class ChatFormat:
    """The three control tokens that frame a message, whether content is trimmed, and (Llama
    4) the token that ends a ``tool`` message, whose header then reads ``ipython`` as in Meta's
    reference format."""

    header_start: str
    header_end: str
    eot: str
    strip: bool = True
    tool_end: str | None = None

    def role_and_end(self, role: str) -> tuple[str, str]:
        """The header text and the closing token of a message from ``role``."""
        if self.tool_end is not None and role == "tool":
            return "ipython", self.tool_end
        return role, self.eot

    def jinja(self) -> str:
        """The format as a Hugging Face chat template (``bos_token`` is the tokenizer's BOS)."""
        head, end, eot = self.header_start, self.header_end, self.eot
        content = f"(message['content']{' | trim' if self.strip else ''})"
        message = f"{{{{ '{head}' + message['role'] + '{end}\\n\\n' + {content} + '{eot}' }}}}"
        if self.tool_end is not None:
            tool = f"{{{{ '{head}ipython{end}\\n\\n' + {content} + '{self.tool_end}' }}}}"
            message = (
                f"{{% if message['role'] == 'tool' %}}{tool}{{% else %}}{message}{{% endif %}}"
            )
        return (
            "{{ bos_token }}"
            "{% for message in messages %}"
            f"{message}"
            "{% endfor %}"
            "{% if add_generation_prompt %}"
            f"{{{{ '{head}assistant{end}\\n\\n' }}}}"
            "{% endif %}"
        )


LLAMA3_CHAT = ChatFormat("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA4_CHAT = ChatFormat(
    "<|header_start|>", "<|header_end|>", "<|eot|>", strip=False, tool_end="<|eom|>"
)


def find_chat_format(special_tokens: Mapping[str, int]) -> ChatFormat | None:
    """The format whose control tokens this vocabulary has, if any."""
    for fmt in (LLAMA3_CHAT, LLAMA4_CHAT):
        if {fmt.header_start, fmt.header_end, fmt.eot} <= special_tokens.keys():
            if fmt.tool_end is not None and fmt.tool_end not in special_tokens:
                return replace(fmt, tool_end=None)
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
        role, end = fmt.role_and_end(m["role"])
        header(role)
        trained = m["role"] == "assistant"
        content = m["content"].strip() if fmt.strip else m["content"]
        pieces.append(Piece(content, trained=trained))
        pieces.append(Piece(end, special=True, trained=trained))
    if add_generation_prompt:
        header("assistant")
    return pieces


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The ids that ask the model for the next assistant turn of ``messages``; a tokenizer
    without a chat format is refused in words a chat user can act on."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except TokenizerError as e:
        raise TokenizerError(
            f"{e}: this tokenizer has no chat format, so it cannot chat; use plain prompts "
            "(camelid generate without --chat)"
        ) from None


def fit_history(
    tokenizer: Tokenizer, messages: list[dict[str, str]], budget: int
) -> tuple[list[int], int]:
    """The prompt ids for a chat (``messages`` ends with the new user message), dropping the
    oldest turns until at most ``budget`` tokens remain, so a long conversation goes on in a
    fixed context. A leading system message is kept, and the history always restarts at a user
    message. Returns the ids and how many messages were dropped from the front of the history
    (they are removed from ``messages``)."""
    system = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    ids = chat_prompt_ids(tokenizer, messages)
    while len(ids) > budget and len(messages) - system > 1:
        del messages[system]
        dropped += 1
        while len(messages) - system > 1 and messages[system]["role"] != "user":
            del messages[system]
            dropped += 1
        ids = chat_prompt_ids(tokenizer, messages)
    return ids, dropped
