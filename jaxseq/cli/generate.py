"""``jaxseq generate``: text in, text out as it is generated, through a swarm. The checkpoint's
``tokenizer.json`` (the ``tokenizers`` library) turns text into token ids and back; a checkpoint without
one takes and prints token ids (space-separated)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

import numpy as np

from jaxseq.client.config import ClientConfig
from jaxseq.client.model import DistributedCausalLM
from jaxseq.client.remote_manager import RemoteSequenceManager
from jaxseq.models.checkpoint import tokenizer_files


class TextCodec:
    """Text to token ids and back, with the checkpoint's tokenizer when it has one, else ids as text.

    Example:
        >>> codec = TextCodec(checkpoint)
        >>> codec.encode("5 7 11").tolist(), codec.decode(np.array([3, 4]))
        ([5, 7, 11], ' 3 4')
    """

    def __init__(self, checkpoint: str, revision: str | None = None):
        found = [path for path in tokenizer_files(checkpoint, revision) if path.name == "tokenizer.json"]
        self.tokenizer = None
        if found:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(found[0]))

    def encode(self, text: str) -> np.ndarray:
        if self.tokenizer is not None:
            return np.asarray(self.tokenizer.encode(text).ids, np.int64)
        try:
            return np.asarray([int(word) for word in text.split()], np.int64)
        except ValueError:
            raise ValueError(
                "this checkpoint has no tokenizer.json: give the prompt as space-separated token ids"
            ) from None

    def decode(self, ids: np.ndarray) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids.tolist())
        return "".join(f" {int(i)}" for i in ids)


def generate_text(
    initial_peers: Sequence[str],
    dht_prefix: str,
    checkpoint: str,
    prompt: str,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    out: TextIO = sys.stdout,
) -> str:
    """Generate after ``prompt`` through the swarm, writing the new text to ``out`` as it comes; returns it."""
    codec = TextCodec(checkpoint)
    ids = codec.encode(prompt)[None]
    pieces: list[str] = []
    generated: list[int] = []

    def stream(tokens: np.ndarray) -> None:
        generated.append(int(tokens[0]))
        text = codec.decode(np.asarray(generated))
        new = text[len("".join(pieces)) :]
        pieces.append(new)
        out.write(new)
        out.flush()

    with RemoteSequenceManager(initial_peers, dht_prefix, ClientConfig()) as manager:
        model = DistributedCausalLM(checkpoint, manager)
        model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
            on_tokens=stream,
        )  # fmt: skip
    out.write("\n")
    return "".join(pieces)
