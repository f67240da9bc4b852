"""``jaxseq monitor`` in a real headless browser, and ``jaxseq serve-api`` driven by the official ``openai``
client, both against real servers of a tiny checkpoint with a real tokenizer and chat template."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import jaxseq
from jaxseq.client.text import TextCodec
from jaxseq.testing.launch import LaunchedProcess

from helpers import TINY, Swarms

ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"

# ChatML, as Qwen's checkpoints ship it: enough Jinja (a loop, a condition, a global) to tell a wrong renderer.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The swarm holds the blocks of the model, and each server serves a span of them.",
    "A client runs the embedding and the head, and sends hidden states through the chain.",
    "Servers keep attention caches for inference sessions; clients replay them after a failure.",
] * 20


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained here and a ChatML chat template."""
    path = jaxseq.random_checkpoint(
        tmp_path_factory.mktemp("web") / "tiny-chat", dataclasses.replace(TINY, vocab_size=512), seed=11
    )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.token_to_id("<|im_end|>")}))
    return path


def launch(*args: str) -> LaunchedProcess:
    """A ``jaxseq`` command that serves HTTP on a port the OS picks; ``announced`` is its URL."""
    command = [sys.executable, "-m", "jaxseq.cli", *args, "--port", "0"]
    return LaunchedProcess(command, ready=f"jaxseq {args[0]} serving on ", name=f"jaxseq-{args[0]}")


# --- the chat template and the text stream, against transformers ---------------------------------------------


def test_the_chat_template_renders_as_transformers_renders_it(chat_checkpoint):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(chat_checkpoint))
    messages = [{"role": "user", "content": "Which server holds block 3?"}, {"role": "assistant", "content": "B."}]
    for conversation in (messages[:1], messages, [{"role": "system", "content": "Be brief."}, *messages]):
        want = reference.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert TextCodec(chat_checkpoint).chat(conversation).tolist() == list(want)


# --- the monitor ---------------------------------------------------------------------------------------------


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium: `make test` installs Debian's chromium where it can (as root with apt)")
    return found


def browse(url: str, *action: str) -> str:
    """``url`` loaded in headless Chromium, its scripts run (a few seconds of virtual time); then ``action``
    (default: print the DOM). Returns what Chromium printed."""
    with tempfile.TemporaryDirectory() as profile:
        # Without the background-networking flags, Chromium keeps dialing Google's hosts, which this machine refuses.
        args = [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000", *(action or ["--dump-dom"]), url,
        ]  # fmt: skip
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def server_rows(dom: str) -> dict[str, tuple[str, str]]:
    """peer -> (span, health) of each server row the page drew."""
    from html.parser import HTMLParser

    rows: dict[str, tuple[str, str]] = {}

    class Rows(HTMLParser):
        peer: str | None = None
        cell: str | None = None
        span = ""

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "tr" and "data-peer" in attrs:
                self.peer, self.health = attrs["data-peer"], attrs["data-health"]
            if tag == "td" and self.peer:
                self.cell = attrs.get("class")

        def handle_data(self, data):
            if self.peer and self.cell == "span":
                rows[self.peer] = (data, self.health)

    Rows().feed(dom)
    return rows


def uncovered_headers(dom: str) -> list[int]:
    import re

    return [int(b) for b in re.findall(r'<th class="block uncovered" data-block="(\d+)"', dom)]


def poll_state(url: str, until, timeout: float = 40.0) -> dict:
    """The monitor's JSON state once ``until(state)`` holds (or the last one after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        state = httpx.get(f"{url}/api/v1/state", timeout=30).json()
        if until(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def health(state: dict) -> dict[str, tuple[list[int], str]]:
    return {s["peer"]: (s["blocks"], s["health"]) for s in state["servers"]}


# --- the OpenAI-compatible API -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm(chat_checkpoint):
    """Two real servers (blocks 0:2 and 2:4) of the chat checkpoint: those the API serves from, and then, after
    the API's tests, the monitor's (which ends one): (``Swarms``, servers, prefix)."""
    with Swarms(chat_checkpoint) as swarms:
        servers, prefix = swarms.start([(0, 2), (2, 4)])
        yield swarms, servers, prefix


@pytest.fixture(scope="module")
def api(chat_checkpoint, swarm):
    """``jaxseq serve-api`` over two real servers, an ``openai`` client of it, and a manager of the same swarm
    for references."""
    _, servers, prefix = swarm
    process = launch(
        "serve-api", "--initial-peers", servers[0].maddr, "--dht-prefix", prefix,
        "--checkpoint", str(chat_checkpoint), "--model-name", "tiny-chat", "--max-tokens-limit", "64",
    )  # fmt: skip
    with process.wait_ready(timeout=120):
        client = openai.OpenAI(base_url=f"{process.announced}/v1", api_key="unused", max_retries=0, timeout=120)
        with jaxseq.RemoteSequenceManager([servers[0].maddr], prefix) as manager:
            model = jaxseq.DistributedCausalLM(chat_checkpoint, manager)
            yield client, model, process, servers
        assert process.terminate() == 0


def greedy(model, ids, max_new_tokens) -> list[int]:
    """The tokens ``generate`` adds, up to and without the first eos (the API stops there)."""
    out = model.generate(np.asarray([ids]), max_new_tokens=max_new_tokens)[0, len(ids) :].tolist()
    eos = model.generation_defaults["eos_token_id"]
    return out[: out.index(eos)] if eos in out else out


def test_models_lists_the_served_model(api):
    client, *_ = api
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_greedy_completions_equal_generate(api, chat_checkpoint, stream):
    client, model, *_ = api
    codec = TextCodec(chat_checkpoint)
    prompt = "The swarm holds the blocks"
    want = codec.decode(greedy(model, codec.encode(prompt).tolist(), 12))
    if stream:
        chunks = list(client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True))  # fmt: skip
        text = "".join(c.choices[0].text for c in chunks)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop") and len(chunks) > 2
    else:
        reply = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0)
        text = reply.choices[0].text
        assert reply.usage.prompt_tokens == len(codec.encode(prompt))
    assert text == want and text


def test_token_id_prompts_and_stop_strings(api, chat_checkpoint):
    client, model, *_ = api
    codec = TextCodec(chat_checkpoint)
    ids = [5, 17, 42, 99]
    full = codec.decode(greedy(model, ids, 16))
    reply = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=16, temperature=0)
    assert reply.choices[0].text == full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    reply = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=16, temperature=0, stop=[stop])
    assert reply.choices[0].text == full[: full.index(stop)] and reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_completions_follow_the_template_and_equal_generate(api, chat_checkpoint, stream):
    client, model, *_ = api
    codec = TextCodec(chat_checkpoint)
    messages = [{"role": "user", "content": "Who holds the blocks?"}]
    want = codec.decode(greedy(model, codec.chat(messages).tolist(), 10))
    if stream:
        chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10,
                                                     temperature=0, stream=True))  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        reply = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0)
        assert reply.choices[0].message.role == "assistant"
        text = reply.choices[0].message.content
    assert text == want and text


def test_sampling_is_reproducible_by_seed(api):
    client, *_ = api

    def ask(seed: int) -> str:
        reply = client.completions.create(
            model="tiny-chat", prompt="A client runs", max_tokens=12, temperature=1.0, top_p=0.9, seed=seed
        )
        return reply.choices[0].text

    first = ask(1)
    assert ask(1) == first and ask(2) != first


def test_concurrent_streams_run_side_by_side(api):
    """Four streams at once all complete, and each got its first tokens before any of them finished: their
    sessions generate side by side, not one after another."""
    client, *_ = api

    def stream(seed: int) -> tuple[float, float, str]:
        chunks = client.completions.create(model="tiny-chat", prompt="Servers keep", max_tokens=24, temperature=1.0,
                                           seed=seed, stream=True)  # fmt: skip
        first = None
        text = ""
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.monotonic()
            text += chunk.choices[0].text if chunk.choices else ""
        return first or time.monotonic(), time.monotonic(), text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(stream, range(4)))
    assert all(text for _, _, text in results)
    assert max(first for first, _, _ in results) < min(end for _, end, _ in results)


def test_a_client_leaving_mid_stream_frees_its_session(api):
    """The generation of a stream whose client went away ends at its next token: the servers' attention
    caches are all free again, and the API keeps serving."""
    client, model, process, servers = api

    def free_cache() -> list[int]:
        return [model.manager.server_info(s.peer_id)["cache_tokens_available"] for s in servers]

    def steps() -> int:
        return model.manager.server_info(servers[-1].peer_id)["jaxseq_computed"].get("inference", 0)

    idle, steps_before = free_cache(), steps()
    body = {"model": "tiny-chat", "prompt": "Servers keep", "max_tokens": 64, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", f"{process.announced}/v1/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")).startswith('data: {"id"')
        assert free_cache() != idle  # the session holds cache on the servers while it streams
    deadline = time.monotonic() + 20
    while free_cache() != idle and time.monotonic() < deadline:
        time.sleep(0.2)
    assert free_cache() == idle
    assert steps() - steps_before < 32  # of the 64 tokens asked for: it stopped when the client left
    assert client.completions.create(model="tiny-chat", prompt="The", max_tokens=2, temperature=0).choices[0].text


BAD_REQUESTS = {
    "no messages": ("chat/completions", {"model": "tiny-chat"}, 400, "messages"),
    "temperature above 2": ("completions", {"model": "tiny-chat", "prompt": "x", "temperature": 5}, 400, "temperature"),
    "another model": ("completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    "n of 2": ("completions", {"model": "tiny-chat", "prompt": "x", "n": 2}, 400, "n"),
    "best_of of 3": ("completions", {"model": "tiny-chat", "prompt": "x", "best_of": 3}, 400, "best_of"),
    "an unknown parameter": ("completions", {"model": "tiny-chat", "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    "too many tokens": ("completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
    "ids beyond the vocabulary": ("completions", {"model": "tiny-chat", "prompt": [1, 512]}, 400, "prompt"),
    "not JSON": ("completions", b"{not json", 400, None),
    "no route": ("embeddings", {"model": "tiny-chat", "input": "x"}, 404, None),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(api, case):
    client, _, process, _ = api
    path, body, status, param = BAD_REQUESTS[case]
    url = f"{process.announced}/v1/{path}"
    reply = httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert client.completions.create(model="tiny-chat", prompt="The", max_tokens=2, temperature=0).choices[0].text


# --- the monitor, over the API's servers: last, as it ends one of them ----------------------------------------


def test_the_monitor_page_shows_the_swarm_and_servers_going(swarm):
    """The page in Chromium shows each live server's span; a server SIGTERMed shows gone and its blocks
    uncovered; a server SIGKILLed turns unreachable, then gone when its DHT record expires. (The API's two
    servers and a spare of blocks 0:2: this test comes after the API's, which need both of those servers.)"""
    swarms, (first, second), prefix = swarm
    (spare,), _ = swarms.start([(0, 2)], prefix, [first.maddr])
    monitor = launch("monitor", "--initial-peers", first.maddr, "--dht-prefix", prefix, "--refresh", "1")
    with monitor.wait_ready(timeout=60):
        url = monitor.announced
        state = poll_state(url, lambda s: len(s["servers"]) == 3)
        assert health(state) == {
            first.peer_id: ([0, 2], "live"), second.peer_id: ([2, 4], "live"), spare.peer_id: ([0, 2], "live")
        }  # fmt: skip
        assert state["uncovered_blocks"] == [] and all(s["rtt_ms"] > 0 for s in state["servers"])
        assert {(s["family"], s["dtype"]) for s in state["servers"]} == {("llama", "float32")}
        dom = browse(url)
        assert server_rows(dom) == {
            first.peer_id: ("0:2", "live"), second.peer_id: ("2:4", "live"), spare.peer_id: ("0:2", "live")
        }  # fmt: skip
        assert uncovered_headers(dom) == [] and "every block is held" in dom

        spare.kill()  # its record stays in the DHT until it expires (twice --update-period, 10 s here)
        killed_at = time.monotonic()
        state = poll_state(url, lambda s: health(s)[spare.peer_id][1] != "live")
        assert health(state)[spare.peer_id][1] == "unreachable" and state["uncovered_blocks"] == []
        state = poll_state(url, lambda s: health(s)[spare.peer_id][1] == "gone")
        assert health(state)[spare.peer_id][1] == "gone" and time.monotonic() - killed_at < 10 + 5

        assert second.terminate() == 0  # it announces OFFLINE as it leaves
        state = poll_state(url, lambda s: s["uncovered_blocks"])
        assert state["uncovered_blocks"] == [2, 3] and health(state)[second.peer_id] == ([2, 4], "gone")
        dom = browse(url)
        assert server_rows(dom) == {
            first.peer_id: ("0:2", "live"), second.peer_id: ("2:4", "gone"), spare.peer_id: ("0:2", "gone")
        }  # fmt: skip
        assert uncovered_headers(dom) == [2, 3] and "no live server holds blocks 2, 3" in dom
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browse(url, f"--screenshot={ARTIFACTS / 'monitor.png'}", "--window-size=1200,340")
        assert (ARTIFACTS / "monitor.png").stat().st_size > 1000
        assert monitor.terminate() == 0
