"""``jaxseq generate``: text in, text out as it is generated, through a swarm (text and token ids:
``jaxseq.client.text``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

import numpy as np

from jaxseq.client.config import ClientConfig
from jaxseq.client.model import DistributedCausalLM
from jaxseq.client.remote_manager import RemoteSequenceManager
from jaxseq.client.text import TextCodec, TextStream


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
    text = TextStream(codec)

    def stream(tokens: np.ndarray) -> None:
        out.write(text.push(int(tokens[0])))
        out.flush()

    with RemoteSequenceManager(initial_peers, dht_prefix, ClientConfig()) as manager:
        model = DistributedCausalLM(checkpoint, manager)
        model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
            on_tokens=stream,
        )  # fmt: skip
    out.write(text.finish() + "\n")
    return text.text
