"""Serving personalized generation over one run: assemble a user's PEFT on request, answer with it.

    POST   /v1/users/{id}/assemble  {"history": [{"input", "output"}, ...]}  -> the recipe
    POST   /v1/generate             {"user", "input", "max_new_tokens"?}     -> {"user", "output"}
    GET    /v1/users/{id}           the recipe's metadata;  DELETE removes it
    GET    /health                  liveness, cache and batching counters
    GET    /v1/models, POST /v1/completions, /v1/chat/completions   the OpenAI API (openai_api.py)

Assembly trains nothing and keeps no history: only the recipe is written (atomically) into the
run's recipes folder, so a restarted server, `perpcs export` and the pipeline all see it.
Materialised adapters live by name in one peft model, the least recently used evicted
(`cache_size`); generate requests arriving within `batch_window_ms` of each other are answered in
one batch, each row with its own user's adapter (peft's mixed-adapter inference, `adapter_names`).
Torch and the pool's sqlite connection are only touched from one worker thread.
"""

import asyncio
import ipaddress
import itertools
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from perpcs.data import Item, check_text, text_problem
from perpcs.errors import InputError
from perpcs.generation import generate
from perpcs.lora import AdapterCache, peft_state_dict
from perpcs.models import load_base
from perpcs.openai_api import BASE_ADAPTER, CODES, RowStreamer, error_response, install_error_handlers, openai_routes
from perpcs.openai_api import PATHS as OPENAI_PATHS
from perpcs.recipe import Recipe, materialize
from perpcs.run_assembly import assemble_history
from perpcs.runfolder import RunFolder

USER_ID = Field(min_length=1, max_length=200)
# A request's text as the data contract has it: not blank, no lone surrogate (a 422, not a failure later)
Text = Annotated[str, AfterValidator(check_text)]


class ServeSettings(BaseModel):
    """Server limits and knobs; the defaults suit SmolLM2-135M on a few CPU cores."""

    model_config = ConfigDict(extra="forbid")
    cache_size: int = Field(8, ge=1, description="materialised adapters kept in memory")
    max_batch: int = Field(8, ge=1, description="generate requests answered together (1: one at a time)")
    batch_window_ms: float = Field(10.0, ge=0, le=60_000, allow_inf_nan=False,
                                   description="how long a batch waits for more requests")
    max_body_bytes: int = Field(1_000_000, ge=1)
    max_history: int = Field(500, ge=1, description="history items per assemble request")
    max_chars: int = Field(4000, ge=1, description="characters per input or output text")
    max_new_tokens: int = Field(64, ge=1, description="largest max_new_tokens a request may ask")
    default_new_tokens: int = Field(16, ge=1)
    api_key: str | None = None


def request_models(s: ServeSettings) -> tuple[type[BaseModel], type[BaseModel]]:
    """The request bodies, with the limits of these settings (pydantic names the field that breaks one)."""
    text = Field(min_length=1, max_length=s.max_chars)

    class HistoryItem(BaseModel):
        model_config = ConfigDict(extra="forbid")
        input: Text = text
        output: Text = text

    class AssembleRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        history: list[HistoryItem] = Field(min_length=1, max_length=s.max_history)

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user: Text = USER_ID
        input: Text = text
        max_new_tokens: int = Field(min(s.default_new_tokens, s.max_new_tokens), ge=1, le=s.max_new_tokens)

    return AssembleRequest, GenerateRequest


def field_error(loc: tuple, msg: str) -> RequestValidationError:
    """A 422 in the same shape as pydantic's: `loc` names the field."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": msg}])


class UnknownUser(LookupError):
    pass


@dataclass
class Pending:
    user: str | None  # None: the base model, no adapter
    prompt: str
    max_new_tokens: int
    future: asyncio.Future = field(repr=False)
    options: tuple = ()  # sorted (name, value) pairs for model.generate (sampling); rows batch only with equal ones
    on_token: Callable[[int], None] | None = field(default=None, repr=False)  # each new token id, from the model thread


class Service:
    """One run's serving model, pool and adapter cache. Every method runs on `self.thread`."""

    def __init__(self, run: RunFolder, settings: ServeSettings):
        self.run, self.settings = run, settings
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="perpcs-model")
        self.counts = {"cache_hits": 0, "cache_misses": 0, "batches": 0, "generated": 0}

    def load(self) -> None:
        """The serving copy of the merged model (assembly wraps `run.merged`, a second copy) and the pool."""
        self.model, self.tokenizer = load_base(self.run.merged_path, device=self.run.device)
        self.cache = AdapterCache(self.model)  # user -> adapter, versioned by the recipe file's mtime
        self.pool = self.run.open_pool()
        self.task = self.run.data.task
        _ = self.run.merged  # the assembly copy: loaded now, not on the first request

    def adapter(self, user: str) -> str:
        """The user's adapter name in the serving model, materialised from the recipe file on a miss."""
        path = self.run.recipe_path(user)
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            self.cache.drop(user)
            raise UnknownUser(user) from None
        name = self.cache.get(user, mtime)
        if name is not None:
            self.counts["cache_hits"] += 1
            return name
        self.counts["cache_misses"] += 1
        self.cache.drop(user)
        recipe = Recipe.load(path)
        return self.cache.put(user, mtime, recipe.peft_config(), peft_state_dict(materialize(recipe, self.pool)))

    def generate(self, rows: list[Pending]) -> list[str | Exception]:
        """One answer per row: rows of equal max_new_tokens and options, at most cache_size users, in one call."""
        out: list[str | Exception] = [UnknownUser(r.user) for r in rows]
        n = max(r.max_new_tokens for r in rows)
        known = []
        for i, r in enumerate(rows):
            try:
                known.append((i, BASE_ADAPTER if r.user is None else self.adapter(r.user)))
            except UnknownUser:
                pass
        self.cache.evict({rows[i].user for i, _ in known}, self.settings.cache_size)
        if known:
            options = dict(rows[0].options)
            if (seed := options.pop("seed", None)) is not None:
                torch.manual_seed(seed)
            if any(rows[i].on_token for i, _ in known):
                options["streamer"] = RowStreamer([rows[i].on_token for i, _ in known])
            peft = self.cache.peft
            model, names = (self.cache.model, None) if peft is None else (peft, [name for _, name in known])
            texts = generate(model, self.tokenizer, [rows[i].prompt for i, _ in known], n,
                             batch_size=len(known), adapter_names=names, **options)
            for (i, _), text in zip(known, texts):
                out[i] = text
            self.counts["batches"] += 1
            self.counts["generated"] += len(known)
        return out

    def assemble(self, user: str, history: list[Item]) -> Recipe:
        recipe = assemble_history(self.run, user, history)
        self.cache.drop(user)
        return recipe

    def delete(self, user: str) -> bool:
        """Remove an assembled user's recipe; a data-set user's is the run's own (the pipeline's), and stays."""
        path = self.run.recipe_path(user)
        if any(u.user_id == user for u in self.run.data.users):
            raise InputError(f"user {user!r} is in the run's data set: its recipe {path} is the run's own")
        with self.run.writing():
            self.cache.drop(user)
            if not path.exists():
                return False
            path.unlink()
        return True


def groups(rows: list[Pending], most_users: int) -> list[list[Pending]]:
    """Split a batch into calls of one max_new_tokens and options, and at most `most_users` distinct users each."""
    out = []
    def same(r):
        return r.max_new_tokens, repr(r.options)

    for _, same_n in itertools.groupby(sorted(rows, key=same), key=same):
        part: list[Pending] = []
        for r in same_n:
            if r.user not in {p.user for p in part} and len({p.user for p in part}) == most_users:
                out.append(part)
                part = []
            part.append(r)
        out.append(part)
    return out


class Batcher:
    """Collects generate requests for up to `batch_window_ms` (or `max_batch` of them) and answers them together."""

    def __init__(self, service: Service):
        self.service = service
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()

    async def submit(self, user: str | None, prompt: str, max_new_tokens: int, options: tuple = (),
                     on_token: Callable[[int], None] | None = None) -> str:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Pending(user, prompt, max_new_tokens, future, options, on_token))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.service.settings
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + s.batch_window_ms / 1000
            while len(batch) < s.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            for rows in groups(batch, s.cache_size):
                try:
                    results = await loop.run_in_executor(self.service.thread, self.service.generate, rows)
                except Exception as e:  # a model failure answers these requests with 500, the server lives on
                    results = [e] * len(rows)
                for r, result in zip(rows, results):
                    if not r.future.done():
                        (r.future.set_exception if isinstance(result, Exception) else r.future.set_result)(result)


def recipe_metadata(user: str, recipe: Recipe, path: Path) -> dict:
    return {"user": user, "pool_id": recipe.pool_id, "base_fingerprint": recipe.base_fingerprint, "mix": recipe.mix,
            "top_k": recipe.top_k, "rank": recipe.rank(), "positions": len(recipe.pieces),
            "sharers": len({sid for chosen in recipe.pieces.values() for sid, _ in chosen}),
            "bytes": path.stat().st_size}


def create_app(run: RunFolder | str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The HTTP app over one run folder (uvicorn serves it; FastAPI's TestClient drives it in tests)."""
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    settings = settings or ServeSettings()
    service = Service(run, settings)
    batcher = Batcher(service)
    AssembleRequest, GenerateRequest = request_models(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.get_running_loop().run_in_executor(service.thread, service.load)
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        service.thread.shutdown(wait=True)

    app = FastAPI(title="perpcs", lifespan=lifespan)
    app.state.service = service
    header = APIKeyHeader(name="X-API-Key", auto_error=False)
    bearer = HTTPBearer(auto_error=False)

    def authorized(key: str | None = Depends(header),
                   auth: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        key = key or (auth.credentials if auth else None)
        if settings.api_key and not (key and secrets.compare_digest(key, settings.api_key)):
            raise HTTPException(401, "missing or wrong API key (X-API-Key or Authorization: Bearer header)")

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if not (length or "").isdigit():
                status, loc, msg = 411, ["header", "content-length"], "a body needs a Content-Length"
            elif int(length) > settings.max_body_bytes:
                status, loc, msg = 413, ["body"], f"body over {settings.max_body_bytes} bytes"
            else:
                return await call_next(request)
            if request.url.path in OPENAI_PATHS:
                return error_response(status, msg, None, CODES[status])
            return JSONResponse({"detail": [{"loc": loc, "msg": msg}]}, status)
        return await call_next(request)

    app.include_router(openai_routes(service, batcher, settings, authorized))
    install_error_handlers(app)

    async def on_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(service.thread, fn, *args)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "adapters_cached": len(service.cache), "cache_size": settings.cache_size,
                **service.counts}

    @app.post("/v1/users/{user}/assemble", dependencies=[Depends(authorized)])
    async def assemble(user: str, body: AssembleRequest) -> dict:  # type: ignore[valid-type]
        if not 1 <= len(user) <= 200 or text_problem(user):
            raise field_error(("path", "user"), text_problem(user) or "a user id has 1 to 200 characters")
        for i, item in enumerate(body.history):
            problem = service.task.output_problem(item.output)
            if problem:
                raise field_error(("body", "history", i, "output"), problem)
        history = [Item(input=it.input, output=it.output) for it in body.history]
        try:
            recipe = await on_thread(service.assemble, user, history)
        except InputError:  # the run folder's, not the request's: the error boundary answers (409)
            raise
        except ValueError as e:  # e.g. every output truncated away: nothing to score pieces on
            raise field_error(("body", "history"), str(e)) from None
        return recipe.model_dump(exclude_none=True)

    @app.post("/v1/generate", dependencies=[Depends(authorized)])
    async def generate_text(body: GenerateRequest) -> dict:  # type: ignore[valid-type]
        try:
            output = await batcher.submit(body.user, service.task.format_prompt(body.input), body.max_new_tokens)
        except UnknownUser:
            raise HTTPException(404, f"no recipe for user {body.user!r}: "
                                     "POST /v1/users/{id}/assemble first") from None
        return {"user": body.user, "output": output}

    @app.get("/v1/users/{user}", dependencies=[Depends(authorized)])
    def user_metadata(user: str) -> dict:
        path = run.recipe_path(user)
        try:
            return recipe_metadata(user, Recipe.load(path), path)
        except FileNotFoundError:
            raise HTTPException(404, f"no recipe for user {user!r}") from None

    @app.delete("/v1/users/{user}", dependencies=[Depends(authorized)])
    async def delete_user(user: str) -> dict:
        if not await on_thread(service.delete, user):
            raise HTTPException(404, f"no recipe for user {user!r}")
        return {"deleted": user}

    return app


def check_host(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key:
        raise ValueError(f"--host {host} is reachable from other machines: set an API key "
                         "(--api-key or PERPCS_API_KEY), or bind 127.0.0.1")


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None) -> None:
    import uvicorn

    settings = settings or ServeSettings()
    check_host(host, settings.api_key)
    uvicorn.run(create_app(run, settings), host=host, port=port, log_level="warning")
