"""HTTP control plane (FastAPI): health, readiness, model load / rollback, stats and metrics.

Mutating endpoints (load, rollback) require ``Authorization: Bearer <token>`` whenever a token is set;
the server refuses to bind HTTP beyond loopback without one. Checkpoint paths are confined to the model
root: anything that resolves outside it (``..``, absolute paths, symlinks) is refused.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel

from server.metrics import Metrics
from server.models import ModelManager


class LoadRequest(BaseModel):
    path: str


def resolve_model_path(raw: str, root: Path) -> Path:
    """The checkpoint ``raw`` names, relative to ``root``; PermissionError if it leaves the root,
    FileNotFoundError if nothing is there, ValueError (or OSError) for any other problem with the path."""
    if not raw or "\0" in raw:
        raise ValueError("path is empty or invalid")
    root = root.resolve()
    try:
        candidate = (root / raw).resolve()  # an absolute raw replaces root; resolve() follows symlinks
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13), a long name
        raise ValueError(f"{raw!r} cannot be resolved: {e}") from None
    if candidate != root and root not in candidate.parents:
        raise PermissionError(f"{raw!r} is outside the model root {root}")
    if candidate.suffix != ".safetensors":
        raise ValueError("checkpoints are .safetensors files")
    if not candidate.exists():
        raise FileNotFoundError(f"{raw!r} does not exist under the model root")
    if not candidate.is_file():  # a folder, a FIFO (reading one would block the loader), a device
        raise ValueError(f"{raw!r} is not a regular file")
    return candidate


def create_app(manager: ModelManager, metrics: Metrics, token: str | None, model_root: Path) -> FastAPI:
    """The control plane of ``manager``'s models: mutations need ``token`` where one is set, and loads are
    confined to ``model_root``."""
    # /docs and /redoc from files the package ships: FastAPI's own pages load them from a CDN, which an
    # offline robot network cannot reach (a blank page).
    app = FastAPIOffline(title="dpmlx control plane", version="1")

    def require_token(authorization: str | None = Header(default=None)) -> None:
        if token is None:
            return
        expected = f"Bearer {token}"
        if authorization is None or not hmac.compare_digest(authorization.encode(), expected.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        active = manager.active
        if active is None:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True, "model": active.info.wire()})

    @app.get("/v1/models")
    def models() -> dict:
        return manager.describe()

    @app.post("/v1/models/load", status_code=202, dependencies=[Depends(require_token)])
    def load(body: LoadRequest) -> dict:
        try:
            path = resolve_model_path(body.path, model_root)
        except PermissionError as e:
            hint = "loads are confined to it: start dpmlx serve with --model-root to choose another"
            raise HTTPException(status_code=403, detail=f"{e} ({hint})") from None
        except FileNotFoundError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None
        except (ValueError, OSError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        try:
            worker = manager.load(path)
        except RuntimeError as e:
            raise HTTPException(status_code=409, detail=str(e)) from None
        return {"loading": {"path": os.fspath(path), "version": worker.version}}

    @app.post("/v1/models/rollback", dependencies=[Depends(require_token)])
    def rollback() -> dict:
        try:
            info = manager.rollback()
        except RuntimeError as e:
            raise HTTPException(status_code=409, detail=str(e)) from None
        return {"active": info.describe()}

    @app.get("/v1/stats")
    def stats() -> dict:
        return {**metrics.stats(), "queue_depth": manager.queue_depth(), "models": manager.startup()}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus_metrics() -> str:
        active = manager.active
        return metrics.prometheus(manager.queue_depth(), active.version if active else None)

    return app
