"""`perpcs serve`: assembly and personalized generation over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from perpcs.commands import console


def serve_cmd(
    run: Path = typer.Option(..., "--run", help="run folder with a pool (recipes are written to RUN/recipes)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; beyond loopback an API key is required"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free one)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PERPCS_API_KEY",
                                          help="required in the X-API-Key header of every /v1 request"),
    cache_size: int = typer.Option(8, "--cache-size", help="materialised adapters kept in memory (LRU)"),
    max_batch: int = typer.Option(8, "--max-batch", help="generate requests answered together (1: one at a time)"),
    batch_window_ms: float = typer.Option(10.0, "--batch-window-ms", help="how long a batch waits for more requests"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="largest max_new_tokens a request may ask"),
) -> None:
    """Serve assembly and personalized generation over HTTP (FastAPI + uvicorn)."""

    from perpcs.serve import ServeSettings, check_host, serve

    settings = ServeSettings(api_key=api_key, cache_size=cache_size, max_batch=max_batch,
                             batch_window_ms=batch_window_ms, max_new_tokens=max_new_tokens)
    check_host(host, api_key)
    console.print(f"serving {run} on http://{host}:{port} (docs at /docs)", markup=False)
    serve(run, host, port, settings)
