"""The ``/lorakit/v1`` HTTP API, mounted by the WebUI (``on_app_started``) and by the standalone app alike.

POST ``train`` / ``copier`` / ``difference`` / ``slider`` (paired) / ``merge`` take the same options the CLI takes
(kohya names for training, the merge verbs' flag names for merges) as a JSON object and answer ``{"id": ...}``;
GET ``jobs`` and ``jobs/{id}`` report progress and results; POST ``jobs/{id}/stop`` (``?cancel=true`` to save
nothing). One job at a time: a second answers 409. Errors are ``{"error": "one line"}`` with 400 (bad input), 404
or 409. Written for fastapi 0.94 / pydantic 1, the WebUI's.

Given credentials (the WebUI's ``--api-auth``), every route asks for HTTP Basic auth and answers 401 otherwise,
the check ``modules/api/api.py`` puts on ``/sdapi/v1`` (WebUI 1.10).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from secrets import compare_digest
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from lorakit_ext.errors import LorakitError, clipped
from lorakit_ext.ui import operations
from lorakit_ext.ui.jobs import Busy, JobManager, UnknownJob

PREFIX = "/lorakit/v1"


def error_status(error: LorakitError) -> int:
    if isinstance(error, Busy):
        return 409
    if isinstance(error, UnknownJob):
        return 404
    return 400


@dataclass(frozen=True)
class RawBody:
    """A request's body as sent. The routes parse it themselves so that every bad body is a 400 ``{"error"}``:
    FastAPI's own check answers 422 with the body echoed back, and pydantic 1 takes a list of pairs for an object."""

    content_type: str
    data: bytes

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object. Only ``application/json``: a browser page of another site can send text/plain
        to a local port without asking first, but not JSON."""
        if self.content_type.partition(";")[0].strip().lower() != "application/json":
            raise LorakitError("the request body must be a JSON object (Content-Type: application/json)")
        try:
            value = json.loads(self.data) if self.data.strip() else None
        except ValueError as error:  # UnicodeDecodeError too
            raise LorakitError(f"the request body is not valid JSON: {error}") from None
        if not isinstance(value, dict):
            raise LorakitError("the request body must be a JSON object")
        return value


async def raw_body(request: Request) -> RawBody:
    return RawBody(request.headers.get("content-type", ""), await request.body())


def json_body(description: str) -> dict:
    """The OpenAPI ``requestBody`` of a route that reads ``RawBody``: a JSON object, described."""
    schema = {"type": "object", "description": description}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def query_flag(name: str, value: str) -> bool:
    """A true/false query parameter (FastAPI's own bool answers a 422)."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise LorakitError(f"{name}: expected true or false, got {clipped(repr(value))}")


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

    def find(job_id: str):
        """The job; an unknown id is cut in the 404, which would otherwise echo whatever the path held."""
        try:
            return manager.get(job_id)
        except UnknownJob:
            raise UnknownJob(f"no job {clipped(job_id)}") from None

    slider_body = ("a, b (folders of A and B images), output_name, output_dir, masked, report, the method's own "
                   "options and training options (kohya names)")

    @router.post("/train", openapi_extra=json_body("TrainConfig options (kohya names), as the CLI's TOML"))
    def train(body: RawBody = Depends(raw_body)):
        return submit(lambda: operations.train_operation(operations.train_config(body.json_object(), host)))

    @router.post("/copier", openapi_extra=json_body(slider_body))
    def copier(body: RawBody = Depends(raw_body)):
        return submit(lambda: operations.slider_operation("copier", body.json_object(), host))

    @router.post("/difference", openapi_extra=json_body(slider_body))
    def difference(body: RawBody = Depends(raw_body)):
        return submit(lambda: operations.slider_operation("difference", body.json_object(), host))

    @router.post("/slider", openapi_extra=json_body(f"the paired method (the CLI's slider verb): {slider_body}"))
    def slider(body: RawBody = Depends(raw_body)):
        return submit(lambda: operations.slider_operation("paired", body.json_object(), host))

    @router.post("/merge", openapi_extra=json_body("MergeRequest: mode, models, ratios, new_rank, ..."))
    def merge(body: RawBody = Depends(raw_body)):
        return submit(lambda: operations.merge_operation(operations.MergeRequest.from_dict(body.json_object()), host))

    @router.post("/dataset", openapi_extra=json_body("the dataset options of a TrainConfig"))
    def dataset(body: RawBody = Depends(raw_body)):
        return answer(lambda: operations.dataset_preview(body.json_object()))

    @router.get("/networks")
    def networks():
        return {name: str(path) for name, path in sorted(host.list_networks().items())}

    @router.get("/jobs")
    def jobs():
        return [record.snapshot() for record in manager.records()]

    @router.get("/jobs/{job_id}")
    def job(job_id: str):
        return answer(lambda: find(job_id).snapshot())

    @router.post("/jobs/{job_id}/stop")
    def stop(job_id: str, cancel: str = Query("false", description="true: end without saving")):
        return answer(lambda: manager.stop(find(job_id).id, cancel=query_flag("cancel", cancel)).snapshot())

    return router


def mount(app: FastAPI, manager: JobManager, credentials: dict[str, str] | None = None) -> None:
    """Add the routes to ``app`` once (the WebUI can fire ``on_app_started`` again after a UI reload)."""
    if any(getattr(route, "path", "").startswith(PREFIX) for route in app.routes):
        return
    app.include_router(build_router(manager, credentials))
