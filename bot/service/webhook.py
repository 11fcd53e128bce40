"""``POST /webhooks/merge``: the Hub's webhook endpoint. Checks, enqueues, answers at once.

The secret is compared in constant time; the body is size-capped and validated against
``huggingface_hub``'s own ``WebhookPayload`` model; nothing slow happens in the request.
"""
from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from bot.service.worker import Service

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
WEBHOOK_PATH = "/webhooks/merge"


def add_webhook_routes(app: FastAPI, service: Service) -> None:
    """Mount the webhook (and a health check) on a FastAPI app: the service's own, or the Space's."""
    from huggingface_hub import WebhookPayload
    from pydantic import ValidationError

    secret = service.config.webhook_secret.encode()

    @app.post(WEBHOOK_PATH)
    async def merge_webhook(request: Request):
        given = request.headers.get("x-webhook-secret", "").encode()
        if not hmac.compare_digest(given, secret):
            return JSONResponse({"error": "invalid or missing X-Webhook-Secret"}, status_code=401)
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": "payload too large"}, status_code=413)
        try:
            payload = WebhookPayload.model_validate_json(body)
        except ValidationError as e:
            return JSONResponse({"error": f"not a Hub webhook payload ({e.error_count()} problem(s))"},
                                status_code=422)
        outcome = await run_in_threadpool(service.receive, payload)  # SQLite writes stay off the event loop
        status = 202 if outcome.status in ("queued", "duplicate", "rejected") else 200
        return JSONResponse({"status": outcome.status, "detail": outcome.detail, "job": outcome.job_id},
                            status_code=status)

    @app.get("/health")
    async def health():
        return {"ok": True, "queued": service.queue.active_count()}


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="merge-bot", docs_url=None, redoc_url=None, openapi_url=None)
    add_webhook_routes(app, service)
    return app
