"""The portal as one router, for the API to serve (``meter.apiserver``)."""

from __future__ import annotations

from fastapi import APIRouter

from infra.settings import Settings
from portal import console, pages, people, web
from portal import settings as account_settings


def router(settings: Settings) -> APIRouter:
    """Every page of the portal under ``/portal/``, none in the OpenAPI document."""
    return web.router(
        settings, pages.router, account_settings.router, people.router, console.router
    )
