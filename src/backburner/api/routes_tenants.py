"""Tenants: the admin API (create, list, limits, weight, disable) and usage reports."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from backburner.api.auth import Identity, admin, identity
from backburner.api.bodies import json_body, read_json
from backburner.api.errors import DEFAULT_RESPONSES, invalid, responses
from backburner.api.state import AppState, app_state
from backburner.errors import InvalidRequest, NotFound
from backburner.schemas.tenants import (
    USAGE_KEYS,
    Tenant,
    TenantCreate,
    TenantList,
    TenantUpdate,
    UsageKey,
    UsageReport,
    UsageRow,
)
from backburner.schemas.validation import check

#: the longest span one usage report covers
MAX_USAGE_DAYS = 366
DEFAULT_GROUP_BY: tuple[UsageKey, ...] = ("day", "model", "lane")
LANES = ("realtime", "slow", "group", "batch")


async def create(
    request: Request, _: Identity = Depends(admin), ctx: AppState = Depends(app_state)
) -> Any:
    payload, _raw = await read_json(request, ctx.settings.max_body_bytes)
    body, problems = check(TenantCreate, payload)
    if body is None:
        raise invalid(problems)
    made = await ctx.store.tenants.create(
        body.id, weight=body.weight, limits={str(k): v for k, v in body.limits.items()}
    )
    if body.disabled:
        made = await ctx.store.tenants.update(body.id, disabled=True)
    return made.model_dump(mode="json")


async def list_tenants(
    _: Identity = Depends(admin),
    ctx: AppState = Depends(app_state),
    after: str | None = None,
    limit: int = 100,
) -> Any:
    limit = max(1, min(limit, 1000))
    found = await ctx.store.tenants.list(after=after, limit=limit + 1)
    page = found[:limit]
    return TenantList(
        data=page,
        has_more=len(found) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    ).model_dump(mode="json")


async def get(
    tenant_id: str, _: Identity = Depends(admin), ctx: AppState = Depends(app_state)
) -> Any:
    return (await ctx.store.tenants.get(tenant_id)).model_dump(mode="json")


async def update(
    tenant_id: str,
    request: Request,
    _: Identity = Depends(admin),
    ctx: AppState = Depends(app_state),
) -> Any:
    payload, _raw = await read_json(request, ctx.settings.max_body_bytes)
    body, problems = check(TenantUpdate, payload)
    if body is None:
        raise invalid(problems)
    changed = await ctx.store.tenants.update(
        tenant_id,
        weight=body.weight,
        limits={k: v for k, v in body.limits.items()},
        disabled=body.disabled,
    )
    # this process refuses the tenant's keys at once (the others within a second)
    ctx.key_cache.clear()
    return changed.model_dump(mode="json")


def _day(value: str | None, name: str, default: date) -> date:
    if value is None or value == "":
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"{name}: expected a date as YYYY-MM-DD, got '{value[:40]}'", param=name
        ) from None


async def usage(
    who: Identity = Depends(identity),
    ctx: AppState = Depends(app_state),
    start: str | None = Query(None, description="first day, YYYY-MM-DD (default: 6 days ago)"),
    end: str | None = Query(None, description="last day, YYYY-MM-DD, included (default: today)"),
    group_by: str | None = Query(
        None, description="comma-separated: day, tenant, model, lane (default: day,model,lane)"
    ),
    tenant: str | None = Query(None, description="an admin key: only this tenant"),
    model: str | None = None,
    lane: str | None = Query(None, description="realtime, slow, group or batch"),
) -> Any:
    today = datetime.now(UTC).date()
    last = _day(end, "end", today)
    first = _day(start, "start", last - timedelta(days=6))
    if first > last:
        raise InvalidRequest(f"start ({first}) is after end ({last})", param="start")
    if (last - first).days + 1 > MAX_USAGE_DAYS:
        raise InvalidRequest(
            f"start to end spans {(last - first).days + 1} days; at most {MAX_USAGE_DAYS}",
            param="start",
        )
    keys: list[UsageKey] = list(DEFAULT_GROUP_BY)
    if group_by is not None:
        asked = [k.strip() for k in group_by.split(",") if k.strip()]
        bad = [k for k in asked if k not in USAGE_KEYS]
        if bad:
            raise InvalidRequest(
                f"group_by: unknown key '{bad[0][:40]}'; allowed: {', '.join(USAGE_KEYS)}",
                param="group_by",
            )
        keys = [k for k in USAGE_KEYS if k in asked]
    if lane is not None and lane not in LANES:
        raise InvalidRequest(
            f"lane: unknown lane '{lane[:40]}'; allowed: {', '.join(LANES)}", param="lane"
        )
    scope: str | None = who.tenant
    if who.admin:
        scope = tenant  # None: every tenant
    elif tenant is not None and tenant != who.tenant:
        raise NotFound(f"No tenant '{tenant[:128]}'.", param="tenant")
    rows = await ctx.store.usage.report(scope, first, last, keys, model=model, lane=lane)
    total = UsageRow(
        tenant=scope,
        requests=sum(r.requests for r in rows),
        failed=sum(r.failed for r in rows),
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        completion_tokens=sum(r.completion_tokens for r in rows),
    )
    total.total_tokens = total.prompt_tokens + total.completion_tokens
    report = UsageReport(start=first, end=last, group_by=keys, data=rows, total=total)
    return report.model_dump(mode="json")


def tenants_router() -> APIRouter:
    r = APIRouter(
        prefix="/v1/admin/tenants",
        tags=["tenants"],
        responses={**responses(401), **DEFAULT_RESPONSES},
    )
    r.add_api_route(
        "",
        create,
        methods=["POST"],
        summary="Create a tenant with its weight and limits (an admin key)",
        response_model=Tenant,
        responses=responses(400, 409, 413),
        openapi_extra=json_body(TenantCreate),
    )
    r.add_api_route(
        "",
        list_tenants,
        methods=["GET"],
        summary="List tenants (an admin key)",
        response_model=TenantList,
    )
    r.add_api_route(
        "/{tenant_id}",
        get,
        methods=["GET"],
        summary="Retrieve a tenant (an admin key)",
        response_model=Tenant,
        responses=responses(404),
    )
    r.add_api_route(
        "/{tenant_id}",
        update,
        methods=["PATCH"],
        summary="Change a tenant's limits or weight, disable or enable it (an admin key)",
        response_model=Tenant,
        responses=responses(400, 404, 413),
        openapi_extra=json_body(TenantUpdate),
    )
    return r


def usage_router() -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["usage"], responses={**responses(401), **DEFAULT_RESPONSES})
    r.add_api_route(
        "/usage",
        usage,
        methods=["GET"],
        summary="Requests and tokens per day, tenant, model and lane",
        response_model=UsageReport,
        responses=responses(400, 404),
    )
    return r
