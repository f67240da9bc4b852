"""``jaxseq serve-api``: OpenAI's completions and chat completions API, generating through the swarm.

``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``, with and without streaming
(server-sent events), as the official ``openai`` client calls them. ``max_tokens``, ``temperature`` (0:
greedy), ``top_p``, ``stop`` and ``seed`` map onto ``DistributedCausalLM.generate``; a chat is put in the
checkpoint's chat template. Each request has its own inference session, so concurrent requests generate
side by side (up to ``max_sessions``; more wait their turn). Bad requests get OpenAI's error objects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, TypeVar, cast

import anyio
import jax
import numpy as np
import pydantic
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxseq.client.errors import SwarmError
from jaxseq.client.model import DistributedCausalLM
from jaxseq.client.text import TextCodec, TextStream

logger = logging.getLogger(__name__)


class _Request(pydantic.BaseModel):
    """What both endpoints take. Parameters jaxseq does not implement are refused unless they have their
    default value, rather than ignored."""

    model_config = pydantic.ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = pydantic.Field(None, ge=1)
    temperature: float = pydantic.Field(1.0, ge=0.0, le=2.0)
    top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = pydantic.Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: dict[Literal["include_usage"], bool] | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logit_bias: None = None
    user: str | None = None

    @pydantic.field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(_Request):
    prompt: str | list[int] = pydantic.Field(min_length=1)
    max_tokens: int | None = pydantic.Field(16, ge=1)  # OpenAI's default for completions
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None


class ChatMessage(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")  # a template may read more than role and content

    role: str
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = pydantic.Field(min_length=1)
    max_completion_tokens: int | None = pydantic.Field(None, ge=1)
    logprobs: Literal[False] | None = None


RequestT = TypeVar("RequestT", bound=_Request)


class ApiError(Exception):
    """An error as OpenAI's API reports it: an HTTP status and ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclasses.dataclass(frozen=True)
class _Generation:
    """One request's generation: prompt ids and how to choose tokens."""

    ids: np.ndarray
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int


@dataclasses.dataclass(frozen=True)
class _Result:
    text: str
    finish_reason: str
    completion_tokens: int


class CompletionsApi:
    """The API over one model. ``max_tokens_limit`` bounds the tokens one request may ask for (and, when it
    asks for none, what it gets, within the model's context)."""

    def __init__(self, model: DistributedCausalLM, codec: TextCodec, model_name: str, max_sessions: int = 8,
                 max_tokens_limit: int = 1024):  # fmt: skip
        if max_sessions < 1 or max_tokens_limit < 1:
            raise ValueError(
                f"max_sessions and max_tokens_limit must be at least 1, got {max_sessions}, {max_tokens_limit}"
            )
        self.model, self.codec, self.model_name = model, codec, model_name
        self.max_tokens_limit = max_tokens_limit
        self.limiter = anyio.CapacityLimiter(max_sessions)
        eos = model.generation_defaults.get("eos_token_id")
        self.eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.created = int(time.time())

    def app(self) -> Starlette:
        """The Starlette app: the three routes, and OpenAI's error objects for every error."""

        async def http_error(request: Request, error: Exception) -> Response:
            status, detail = cast(HTTPException, error).status_code, cast(HTTPException, error).detail
            return _error_response(ApiError(status, f"{request.method} {request.url.path}: {detail}"))

        return Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            ],
            exception_handlers={HTTPException: http_error},
        )

    async def models(self, request: Request) -> Response:
        model = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "jaxseq"}
        return JSONResponse({"object": "list", "data": [model]})

    async def completions(self, request: Request) -> Response:
        try:
            body = await self._parse(request, CompletionRequest)
            if isinstance(body.prompt, str):
                try:
                    ids = self.codec.encode(body.prompt)
                except ValueError as error:
                    raise ApiError(400, str(error), param="prompt") from None
            else:
                ids = np.asarray(body.prompt, np.int64)
            return await self._respond(body, ids, body.max_tokens, chat=False)
        except ApiError as error:
            return _error_response(error)

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await self._parse(request, ChatRequest)
            try:
                ids = self.codec.chat([m.model_dump() for m in body.messages])
            except Exception as error:  # the template's own refusals (raise_exception) and a missing template
                raise ApiError(
                    400, f"the chat template could not render these messages: {error}", param="messages"
                ) from None
            return await self._respond(body, ids, body.max_completion_tokens or body.max_tokens, chat=True)
        except ApiError as error:
            return _error_response(error)

    async def _parse(self, request: Request, schema: type[RequestT]) -> RequestT:
        try:
            raw = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the request body is not JSON: {error}") from None
        try:
            body = schema.model_validate(raw)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            param = str(first["loc"][0]) if first["loc"] else None  # the request's field, as OpenAI names it
            where = ".".join(str(part) for part in first["loc"])
            raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=param) from None
        if body.model != self.model_name:
            raise ApiError(
                404, f"the model {body.model!r} does not exist: this server serves {self.model_name!r}",
                param="model", code="model_not_found",
            )  # fmt: skip
        return body

    def _generation(self, body: _Request, ids: np.ndarray, max_tokens: int | None) -> _Generation:
        context = self.model.config.max_position_embeddings
        if len(ids) == 0:
            raise ApiError(400, "the prompt has no tokens", param="prompt")
        vocab = self.model.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ApiError(
                400, f"token ids must be in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}", param="prompt"
            )
        room = context - len(ids)
        if max_tokens is None:
            max_tokens = min(room, self.max_tokens_limit)
        if max_tokens > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens is at most {self.max_tokens_limit} on this server, got {max_tokens}",
                           param="max_tokens")  # fmt: skip
        if max_tokens > room:
            raise ApiError(
                400, f"this model's maximum context length is {context} tokens: {len(ids)} in the prompt and "
                f"{max_tokens} to generate don't fit", param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        return _Generation(ids, max_tokens, body.temperature, body.top_p, tuple(body.stop or ()), seed)

    def _generate(self, job: _Generation, on_text: Callable[[str], None], cancelled: threading.Event) -> _Result:
        """Run one generation (in a worker thread: it blocks on the swarm), handing out text as it is final."""
        text = TextStream(self.codec, job.stop)
        count = 0
        ended_by_eos = False

        def on_tokens(tokens: np.ndarray) -> bool:
            nonlocal count, ended_by_eos
            count += 1
            token = int(tokens[0])
            ended_by_eos = token in self.eos
            piece = "" if ended_by_eos else text.push(token)
            if piece:
                on_text(piece)
            return text.stopped or cancelled.is_set()

        self.model.generate(
            job.ids[None], max_new_tokens=job.max_tokens, do_sample=job.temperature > 0,
            temperature=job.temperature or 1.0, top_p=job.top_p, key=jax.random.key(job.seed), on_tokens=on_tokens,
        )  # fmt: skip
        tail = text.finish()
        if tail:
            on_text(tail)
        finish = "stop" if text.stopped or ended_by_eos else "length"
        return _Result(text.text, finish, count)

    async def _respond(self, body: _Request, ids: np.ndarray, max_tokens: int | None, chat: bool) -> Response:
        job = self._generation(body, ids, max_tokens)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        usage = lambda result: {  # noqa: E731
            "prompt_tokens": len(ids), "completion_tokens": result.completion_tokens,
            "total_tokens": len(ids) + result.completion_tokens,
        }  # fmt: skip
        head = {"id": ident, "created": int(time.time()), "model": self.model_name}
        if not body.stream:
            result = await self._run(job, lambda piece: None, threading.Event())
            if chat:
                message = {"role": "assistant", "content": result.text}
                choice = {"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
            return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion",
                                 "choices": [choice], "usage": usage(result)})  # fmt: skip

        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return _event({**head, "object": kind, "choices": [choice]})

        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            self._stream(job, chunk, usage, head, kind, include_usage, chat), media_type="text/event-stream"
        )

    async def _stream(self, job: _Generation, chunk: Callable[..., str], usage: Callable[[_Result], dict],
                      head: dict, kind: str, include_usage: bool, chat: bool) -> AsyncIterator[str]:  # fmt: skip
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        cancelled = threading.Event()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        running = asyncio.ensure_future(self._run(job, on_text, cancelled))
        running.add_done_callback(lambda _: pieces.put_nowait(None))
        try:
            if chat:
                yield chunk(None, None, role=True)
            while (piece := await pieces.get()) is not None:
                yield chunk(piece, None)
            try:
                result = running.result()
            except ApiError as error:
                yield _event(error.body)
                return
            yield chunk(None, result.finish_reason)
            if include_usage:
                yield _event({**head, "object": kind, "choices": [], "usage": usage(result)})
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # the client went away: the generation ends at its next token, freeing its session

    async def _run(self, job: _Generation, on_text: Callable[[str], None], cancelled: threading.Event) -> _Result:
        try:
            return await anyio.to_thread.run_sync(self._generate, job, on_text, cancelled, limiter=self.limiter)
        except SwarmError as error:
            raise ApiError(503, f"the swarm could not serve this request: {error}", kind="server_error") from None
        except ApiError:
            raise
        except Exception as error:
            logger.exception("generation failed")
            raise ApiError(500, f"generation failed: {type(error).__name__}: {error}", kind="server_error") from None


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body, status_code=error.status)
