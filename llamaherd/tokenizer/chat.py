"""The Llama 3 chat format: dialogs of ``{"role": ..., "content": ...}`` messages to token ids.

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n            <- the generation prompt

Content is stripped of surrounding whitespace, as the Hugging Face Llama 3 Instruct template's
``| trim`` does; the ``tool`` role is written ``ipython``, as Meta's reference does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llamaherd.errors import HerdError
from llamaherd.tokenizer.tiktoken_bpe import Tokenizer

ROLES = ("system", "user", "assistant", "ipython", "tool")
Message = Mapping[str, str]


def check_message(message: object, where: str = "message") -> tuple[str, str]:
    """Return ``(role, content)`` of a valid message, or raise a HerdError saying what is wrong."""
    if not isinstance(message, Mapping):
        raise HerdError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or role not in ROLES:
        raise HerdError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise HerdError(f"{where}: content must be a string, got {type(content).__name__}")
    return role, content


class ChatFormat:
    """Encodes messages and dialogs in the Llama 3 Instruct format."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, message: Message | str) -> list[int]:
        """``<|start_header_id|>{role}<|end_header_id|>\\n\\n`` for a message or a bare role."""
        role = message if isinstance(message, str) else check_message(message)[0]
        if role not in ROLES:
            raise HerdError(f"message: role {role!r} is not one of {', '.join(ROLES)}")
        tok = self.tokenizer
        return [
            tok.special_tokens["<|start_header_id|>"],
            *tok.encode("ipython" if role == "tool" else role),
            tok.special_tokens["<|end_header_id|>"],
            *tok.encode("\n\n"),
        ]

    def encode_message(self, message: Message) -> list[int]:
        """Header, stripped content, ``<|eot_id|>``."""
        role, content = check_message(message)
        return self.encode_header(role) + self.tokenizer.encode(content.strip()) + [self.tokenizer.eot_id]

    def encode_dialog_prompt(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """``<|begin_of_text|>``, every message, then (by default) an empty assistant header."""
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise HerdError(f"dialog: expected a list of messages, got {type(messages).__name__}")
        ids = [self.tokenizer.bos_id]
        for i, message in enumerate(messages):
            check_message(message, f"message {i}")
            ids += self.encode_message(message)
        if add_generation_prompt:
            ids += self.encode_header("assistant")
        return ids

    def decode_assistant(self, ids: Sequence[int]) -> str:
        """Text of a generated reply: everything before the first stop token (eot, eom, end_of_text)."""
        ids = list(ids)
        stops = set(self.tokenizer.stop_tokens)
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer.decode(ids[:end])


def render_dialog_prompt(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The text ``ChatFormat.encode_dialog_prompt`` encodes, special tokens written out: what a Hugging Face
    chat template renders for Llama 3 Instruct (lm-evaluation-harness scores and prompts with this text)."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise HerdError(f"dialog: expected a list of messages, got {type(messages).__name__}")
    out = "<|begin_of_text|>"
    for i, message in enumerate(messages):
        role, content = check_message(message, f"message {i}")
        if role not in ROLES:
            raise HerdError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        role = "ipython" if role == "tool" else role
        out += f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
    if add_generation_prompt:
        out += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return out
