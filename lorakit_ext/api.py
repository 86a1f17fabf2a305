"""The ``/lorakit/v1`` HTTP API, mounted by the WebUI (``on_app_started``) and by the standalone app alike.

POST ``train`` / ``copier`` / ``difference`` / ``merge`` take the same options the CLI takes (kohya names for
training, the merge verbs' flag names for merges) and answer ``{"id": ...}``; GET ``jobs`` and ``jobs/{id}``
report progress and results; POST ``jobs/{id}/stop`` (``?cancel=true`` to save nothing). One job at a time: a
second answers 409. Errors are ``{"error": "one line"}`` with 400 (bad input), 404 or 409. Written for fastapi
0.94 / pydantic 1, the WebUI's.

Given credentials (the WebUI's ``--api-auth``), every route asks for HTTP Basic auth and answers 401 otherwise,
the check ``modules/api/api.py`` puts on ``/sdapi/v1`` (WebUI 1.10).
"""

from __future__ import annotations

from secrets import compare_digest
from typing import Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from lorakit_ext.errors import LorakitError
from lorakit_ext.ui import operations
from lorakit_ext.ui.jobs import Busy, JobManager, UnknownJob

PREFIX = "/lorakit/v1"


def error_status(error: LorakitError) -> int:
    if isinstance(error, Busy):
        return 409
    if isinstance(error, UnknownJob):
        return 404
    return 400


def parse_credentials(api_auth: str) -> dict[str, str]:
    """``user:password[,user:password...]`` (the WebUI's ``--api-auth``) as user -> password."""
    credentials = {}
    for entry in api_auth.split(","):
        user, colon, password = entry.partition(":")
        if not colon:
            raise LorakitError(f"--api-auth: {entry!r} is not user:password")
        credentials[user] = password
    return credentials


def basic_auth(credentials: dict[str, str]):
    """A route dependency that lets through only these users, answering 401 as the WebUI's ``Api.auth`` does."""

    def check(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> None:
        expected = credentials.get(given.username)
        if expected is None or not compare_digest(given.password.encode(), expected.encode()):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    return check


def build_router(manager: JobManager, credentials: dict[str, str] | None = None) -> APIRouter:
    """The routes over ``manager`` (and its host's path rules), behind HTTP Basic auth when ``credentials``."""
    dependencies = [Depends(basic_auth(credentials))] if credentials else []
    router = APIRouter(prefix=PREFIX, tags=["lorakit"], dependencies=dependencies)
    host = manager.host

    def answer(make):
        try:
            return make()
        except LorakitError as error:
            return JSONResponse(status_code=error_status(error), content={"error": str(error)})

    def submit(build) -> Any:
        return answer(lambda: {"id": manager.submit(build()).id})

    @router.post("/train")
    def train(config: dict = Body(..., description="TrainConfig options (kohya names), as the CLI's TOML")):
        return submit(lambda: operations.train_operation(operations.train_config(config, host)))

    @router.post("/copier")
    def copier(config: dict = Body(...)):
        return submit(lambda: operations.slider_operation("copier", config, host))

    @router.post("/difference")
    def difference(config: dict = Body(...)):
        return submit(lambda: operations.slider_operation("difference", config, host))

    @router.post("/merge")
    def merge(request: dict = Body(..., description="MergeRequest: mode, models, ratios, new_rank, ...")):
        return submit(lambda: operations.merge_operation(operations.MergeRequest.from_dict(request), host))

    @router.post("/dataset")
    def dataset(config: dict = Body(..., description="the dataset options of a TrainConfig")):
        return answer(lambda: operations.dataset_preview(config))

    @router.get("/networks")
    def networks():
        return {name: str(path) for name, path in sorted(host.list_networks().items())}

    @router.get("/jobs")
    def jobs():
        return [record.snapshot() for record in manager.records()]

    @router.get("/jobs/{job_id}")
    def job(job_id: str):
        return answer(lambda: manager.get(job_id).snapshot())

    @router.post("/jobs/{job_id}/stop")
    def stop(job_id: str, cancel: bool = False):
        return answer(lambda: manager.stop(job_id, cancel=cancel).snapshot())

    return router


def mount(app: FastAPI, manager: JobManager, credentials: dict[str, str] | None = None) -> None:
    """Add the routes to ``app`` once (the WebUI can fire ``on_app_started`` again after a UI reload)."""
    if any(getattr(route, "path", "").startswith(PREFIX) for route in app.routes):
        return
    app.include_router(build_router(manager, credentials))
