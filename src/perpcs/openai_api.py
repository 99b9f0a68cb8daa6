"""The OpenAI API over `perpcs serve`: an application that uses the `openai` client personalizes by
changing the base URL and the model name, as with vLLM, LoRAX or TGI, which also pick a LoRA by `model`.

    GET  /v1/models             the base model and every user with a recipe
    POST /v1/completions        {"model": user id or base, "prompt", "max_tokens", "temperature", ...}
    POST /v1/chat/completions   {"model", "messages", ...}; "stream": true answers as server-sent events

`model` is a user id (their recipe's adapter) or the base's name (no adapter; the base wins a clash).
A chat of one user message is formatted with the task's prompt, as the model was task-adapted on it;
any other chat with the tokenizer's chat template. Requests go through the server's batcher, so
concurrent ones for different users share a mixed-adapter batch; a batch shares one sampling setting
(temperature 0 is greedy, as offline generation). `stop` cuts the text where a stop string starts.
Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Callable, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers.generation.streamers import BaseStreamer

from perpcs.errors import FILE_ERRORS, InputError, describe

BASE_ADAPTER = "__base__"  # peft's name for rows of a mixed-adapter batch that use no adapter
PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
log = logging.getLogger(__name__)
# Failures of what the server reads and writes in the run folder, not of the request: a 409 with the message
KNOWN = (InputError, *FILE_ERRORS)
CODES = {401: "invalid_api_key", 404: "model_not_found", 411: "length_required", 413: "request_too_large"}


class RowStreamer(BaseStreamer):
    """Hands each row's new token id to that row's callback (transformers' own streamers take one row)."""

    def __init__(self, callbacks: list[Callable[[int], None] | None]):
        self.callbacks, self.prompt_seen = callbacks, False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call passes the prompts
            self.prompt_seen = True
            return
        for fn, token in zip(self.callbacks, value.reshape(len(self.callbacks), -1)[:, -1].tolist()):
            if fn:
                fn(token)

    def end(self) -> None:
        pass


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def install_error_handlers(app: FastAPI) -> None:
    """The server's one error boundary: OpenAI's error shape on the OpenAI paths, FastAPI's (`detail`) on the
    others. A 422 never echoes the input (NaN and lone surrogates are no JSON); a known failure of the run
    folder (a corrupt recipe or pool, a read-only folder, a full disk, another process holding the run) is
    a logged 409 naming the file; any other fault a logged 500; none is an unhandled exception."""
    def ours(request: Request) -> bool:
        return request.url.path in PATHS

    def fault(request: Request, status: int, message: str) -> JSONResponse:
        if ours(request):
            return error_response(status, message, None, None, "server_error" if status >= 500 else "conflict")
        return JSONResponse({"detail": message}, status)

    @app.middleware("http")
    async def faults(request: Request, call_next):
        try:
            return await call_next(request)
        except KNOWN as e:
            log.warning("%s %s: %s", request.method, request.url.path, describe(e))
            return fault(request, 409, describe(e))
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return fault(request, 500, "internal server error (the server's log has the details)")

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, e: OpenAIError):
        return error_response(e.status, e.message, e.param, e.code, e.kind)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if not ours(request):
            return await http_exception_handler(request, e)
        return error_response(e.status_code, str(e.detail), None, CODES.get(e.status_code))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        if not ours(request):
            return JSONResponse({"detail": [{k: err[k] for k in ("type", "loc", "msg") if k in err}
                                            for err in e.errors()]}, 422)
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or None  # loc starts with "body"
        return error_response(400, f"{param}: {first['msg']}" if param else first["msg"], param, "invalid_value")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] = Field(description="text, or a list of {'type': 'text', 'text'} parts")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(p.get("type") != "text" for p in self.content):
            raise OpenAIError(400, "only text content parts are supported", "messages", "invalid_value")
        return "".join(str(p.get("text", "")) for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


def request_models(s) -> tuple[type[BaseModel], type[BaseModel]]:
    """The two request bodies, with the server's limits (ServeSettings `s`); fields OpenAI has and perpcs
    does not use (user, logprobs off, ...) are ignored, as OpenAI-compatible servers do."""
    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str = Field(min_length=1, max_length=200)
        max_tokens: int = Field(min(s.default_new_tokens, s.max_new_tokens), ge=1, le=s.max_new_tokens)
        temperature: float = Field(1.0, ge=0, le=2, description="0: greedy")
        top_p: float = Field(1.0, gt=0, le=1)
        stop: str | list[str] | None = Field(None, description="up to 4 strings the text ends before")
        n: int = Field(1, ge=1, le=1, description="one choice per request")
        seed: int | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None

        @model_validator(mode="after")
        def _text(self):
            """No lone surrogate anywhere (it is not text: the tokenizer would fail on it, not the request)."""
            try:
                json.dumps(self.model_dump(), ensure_ascii=False).encode()
            except UnicodeEncodeError:
                raise ValueError("the request holds a lone surrogate, which is not text") from None
            return self

        def stops(self) -> list[str]:
            stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
            if len(stops) > 4 or not all(stops):
                raise OpenAIError(400, "stop: up to 4 non-empty strings", "stop", "invalid_value")
            return stops

        def options(self) -> tuple:
            """model.generate's sampling options, hashable so that equal ones batch together."""
            if self.temperature == 0:
                return ()
            sample = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
            return tuple(sorted({**sample, **({} if self.seed is None else {"seed": self.seed})}.items()))

    class CompletionRequest(Sampling):
        prompt: str | list[str] = Field(description="the prompt as the model sees it (no task formatting)")

        def text(self) -> str:
            if isinstance(self.prompt, str):
                return self.prompt
            if len(self.prompt) != 1:
                raise OpenAIError(400, "prompt: one prompt per request", "prompt", "invalid_value")
            return self.prompt[0]

    class ChatRequest(Sampling):
        messages: list[Message] = Field(min_length=1, max_length=s.max_history)
        max_completion_tokens: int | None = Field(None, ge=1, le=s.max_new_tokens)

    return CompletionRequest, ChatRequest


class Decoder:
    """A choice's text as tokens arrive: what may be sent yet (not a partial character or the start of a
    stop string), where a stop string or the end of text ends it, and how many tokens it took."""

    def __init__(self, tokenizer, stops: list[str], limit: int):
        self.tokenizer, self.stops, self.limit = tokenizer, stops, limit
        self.ids: list[int] = []
        self.text, self.sent, self.eos, self.stopped = "", 0, False, False

    def push(self, token: int) -> str:
        """The new text that can be sent after `token` ("" once the text has ended)."""
        if self.eos or self.stopped:
            return ""
        if token == self.tokenizer.eos_token_id:
            self.eos = True
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.cut():
            return self.take(len(self.text))
        return self.take(len(self.text) - max(self.text.endswith("\ufffd"), self.held()))

    def cut(self) -> bool:
        at = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if at:
            self.text, self.stopped = self.text[: min(at)], True
        return bool(at)

    def held(self) -> int:
        """Length of the longest end of the text that begins a stop string."""
        return max([n for s in self.stops for n in range(1, len(s)) if self.text.endswith(s[:n])], default=0)

    def take(self, upto: int) -> str:
        out = self.text[self.sent: max(self.sent, upto)]
        self.sent += len(out)
        return out

    def final(self, text: str) -> str:
        """Ends the choice on the batch's own answer (the same text offline generation gives), cut at a stop
        string; returns what was not sent yet."""
        if not self.stopped:
            self.text = text
            self.cut()
        return self.take(len(self.text))

    @property
    def finish(self) -> str:
        return "length" if not (self.eos or self.stopped) and len(self.ids) >= self.limit else "stop"


def openai_routes(service, batcher, settings, authorized: Callable) -> APIRouter:
    """The OpenAI routes of one server: `service` (serve.Service), its `batcher`, and its settings."""
    router = APIRouter(dependencies=[Depends(authorized)])
    CompletionRequest, ChatRequest = request_models(settings)

    def base_name() -> str:
        return Path(service.run.config.base or "default").name

    def users() -> list[str]:
        from perpcs.recipe import Recipe

        folder = service.run.folder / "recipes"
        files = sorted(folder.glob("*.recipe")) + sorted(folder.glob("*.json")) if folder.is_dir() else []
        return sorted({Recipe.load(f).user or f.stem for f in files})

    def resolve(model: str) -> str | None:
        """The user whose adapter answers `model` (None: the base), or a 404."""
        if model == base_name():
            return None
        if not service.run.recipe_path(model).exists():
            raise OpenAIError(404, f"The model {model!r} does not exist: no recipe for this user "
                                   "(POST /v1/users/{id}/assemble first) and not the base "
                                   f"{base_name()!r}", "model", "model_not_found")
        return model

    def chat_prompt(body) -> str:
        texts = [m.text() for m in body.messages]
        if len(body.messages) == 1 and body.messages[0].role == "user":
            return service.task.format_prompt(texts[0])
        tok = service.tokenizer
        if not getattr(tok, "chat_template", None):
            raise OpenAIError(400, "this model's tokenizer has no chat template: send one user message (it is "
                                   "formatted with the task's prompt)", "messages", "invalid_value")
        return tok.apply_chat_template([{"role": m.role, "content": t} for m, t in zip(body.messages, texts)],
                                       tokenize=False, add_generation_prompt=True)

    @router.get("/v1/models")
    def models() -> dict:
        created = int(service.run.folder.stat().st_mtime)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": owner}
                                           for m, owner in [(base_name(), "perpcs")] + [(u, "user") for u in users()]]}

    async def answer(body, prompt: str, chat: bool):
        user, stops = resolve(body.model), body.stops()
        limit = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        decoder = Decoder(service.tokenizer, stops, limit)
        prompt_tokens = len(service.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": body.model}

        def usage() -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": len(decoder.ids),
                    "total_tokens": prompt_tokens + len(decoder.ids)}

        def choice(text: str, finish: str | None, stream: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            message = {"content": text} if stream else {"role": "assistant", "content": text}
            return {"index": 0, "delta" if stream else "message": message, "logprobs": None, "finish_reason": finish}

        if not body.stream:
            ids: list[int] = []
            text = await batcher.submit(user, prompt, limit, body.options(), ids.append)
            for token in ids:
                decoder.push(token)
            decoder.final(text)
            return {**meta, "object": "chat.completion" if chat else "text_completion",
                    "choices": [choice(decoder.text, decoder.finish, False)], "usage": usage()}

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = asyncio.ensure_future(batcher.submit(user, prompt, limit, body.options(),
                                                   lambda t: loop.call_soon_threadsafe(queue.put_nowait, t)))
        job.add_done_callback(lambda f: queue.put_nowait(None))
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list, **extra) -> str:
            return f"data: {json.dumps({**meta, 'object': kind, 'choices': choices, **extra})}\n\n"

        async def events():
            if chat:
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            while (token := await queue.get()) is not None:
                if delta := decoder.push(token):
                    yield event([choice(delta, None, True)])
            if job.cancelled() or job.exception() is not None:
                error = {"message": "generation failed", "type": "server_error",
                         "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
            else:
                if rest := decoder.final(job.result()):
                    yield event([choice(rest, None, True)])
                yield event([choice("", decoder.finish, True)])
                if body.stream_options and body.stream_options.include_usage:
                    yield event([], usage=usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest):  # type: ignore[valid-type]
        return await answer(body, body.text(), chat=False)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):  # type: ignore[valid-type]
        return await answer(body, chat_prompt(body), chat=True)

    return router
