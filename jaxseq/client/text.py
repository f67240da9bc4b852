"""Text around generation: a checkpoint's tokenizer and chat template, and generated text as it grows, cut at
stop strings. ``jaxseq generate`` and ``jaxseq serve-api`` use it.

The tokenizer is the checkpoint's ``tokenizer.json`` (the ``tokenizers`` library); a checkpoint without one
takes and gives token ids as space-separated text. The chat template is the Jinja template of
``tokenizer_config.json``, rendered as transformers' ``apply_chat_template`` renders it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxseq.models.checkpoint import tokenizer_files
from jaxseq.models.hub import PathLike


class TextCodec:
    """Text to token ids and back, with the checkpoint's tokenizer when it has one, else ids as text.

    Example:
        >>> codec = TextCodec(checkpoint)
        >>> codec.encode("5 7 11").tolist(), codec.decode(np.array([3, 4]))
        ([5, 7, 11], ' 3 4')
        >>> codec.chat([{"role": "user", "content": "hi"}])
        Traceback (most recent call last):
        ...
        ValueError: this checkpoint has no chat template (tokenizer_config.json's "chat_template"): use completions
    """

    def __init__(self, checkpoint: PathLike, revision: str | None = None):
        files = {path.name: path for path in tokenizer_files(checkpoint, revision)}
        self.tokenizer = None
        if "tokenizer.json" in files:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(files["tokenizer.json"]))
        self.tokenizer_config: dict[str, Any] = {}
        if "tokenizer_config.json" in files:
            self.tokenizer_config = json.loads(files["tokenizer_config.json"].read_text())

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """Token ids of ``text`` (with the tokenizer's BOS and the like, unless ``add_special_tokens=False``)."""
        if self.tokenizer is not None:
            return np.asarray(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, np.int64)
        try:
            return np.asarray([int(word) for word in text.split()], np.int64)
        except ValueError:
            raise ValueError(
                "this checkpoint has no tokenizer.json: give the prompt as space-separated token ids"
            ) from None

    def decode(self, ids: np.ndarray | Sequence[int]) -> str:
        """The text of token ids, special tokens left out."""
        if self.tokenizer is not None:
            return self.tokenizer.decode(np.asarray(ids).tolist())
        return "".join(f" {int(i)}" for i in ids)

    def chat(self, messages: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Token ids of a conversation in the checkpoint's chat template, ending with the assistant's turn
        (``add_generation_prompt=True``), as transformers' ``apply_chat_template(..., tokenize=True)``."""
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):  # several named templates, as transformers stores them: take "default"
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if not isinstance(template, str):
            raise ValueError(
                'this checkpoint has no chat template (tokenizer_config.json\'s "chat_template"): use completions'
            )
        special = {name: _token_text(self.tokenizer_config.get(name)) for name in _SPECIAL_TOKENS}
        text = _compiled(template).render(messages=list(messages), add_generation_prompt=True, **special)
        return self.encode(text, add_special_tokens=False)


_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(token: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or an ``AddedToken`` dict."""
    return token.get("content") if isinstance(token, dict) else token


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """The template compiled as transformers compiles chat templates: sandboxed, blocks trimmed, and with
    its ``raise_exception`` (a template's way to refuse a conversation)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template)


class TextStream:
    """Generated text as tokens arrive, cut before the first of ``stop`` strings. ``push`` returns the text
    that is final (a tail that may begin a stop string is held back until it can't); ``finish`` returns what
    was held back.

    Example:
        >>> stream = TextStream(TextCodec(checkpoint), stop=[" 9"])
        >>> stream.push(5), stream.push(7), stream.push(9), stream.stopped, stream.text  # " 5 7 9" cut at " 9"
        (' ', '5 ', '7', True, ' 5 7')
    """

    def __init__(self, codec: TextCodec, stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self.codec, self.stop = codec, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # what was returned so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a generated token; the new final text (empty once a stop string appeared)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        decoded = self.codec.decode(self.ids)
        if decoded.endswith("\ufffd"):  # a character split across tokens: wait for the rest of it
            return ""
        cuts = [i for i in (decoded.find(s, max(len(self.text) - len(s), 0)) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            return self._advance(decoded[: min(cuts)])
        held = max((len(s) - 1 for s in self.stop), default=0)
        return self._advance(decoded[: len(decoded) - held] if held else decoded)

    def finish(self) -> str:
        """The text held back, once no token will come."""
        return "" if self.stopped else self._advance(self.codec.decode(self.ids))

    def _advance(self, final: str) -> str:
        new = final[len(self.text) :] if final.startswith(self.text) else ""
        self.text += new
        return new
