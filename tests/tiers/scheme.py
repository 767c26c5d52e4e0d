"""The scheme documents' tier scheme (消费40%: 每1000元40分; 积分40%: 每1000积分40分; 活跃20%;
普通0-100, 银卡101-300, 金卡301-600, 钻石601+; 保级 银卡80 金卡240 钻石480; 每季度评定;
大促期间达标120%, 临时升级1个月), shared by the tiers tests."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from jifen.tiers.schemas import TierScheme

TIERS = [
    {"code": "普通", "name": "普通会员", "rank": 0},
    {"code": "银卡", "name": "银卡会员", "rank": 1},
    {"code": "金卡", "name": "金卡会员", "rank": 2},
    {"code": "钻石", "name": "钻石会员", "rank": 3},
]


def scheme_json(
    *,
    upgrade_at_once: bool = True,
    campaigns: list[tuple[datetime, datetime]] = (),  # type: ignore[assignment]
    benefits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "parts": {
            "spend": {"per_yuan": 1000, "score": 40},
            "earned": {"per_points": 1000, "score": 40},
            "activity": {"event_types": ["member.checked_in"], "per_events": 1, "score": 1},
        },
        "window_months": 12,
        "levels": [
            {"tier": "普通", "min_score": 0},
            {"tier": "银卡", "min_score": 101, "retention": 80},
            {"tier": "金卡", "min_score": 301, "retention": 240},
            {"tier": "钻石", "min_score": 601, "retention": 480},
        ],
        "schedule": "quarterly",
        "upgrade_at_once": upgrade_at_once,
        "temporary_upgrades": [
            {
                "name": "双11",
                "starts_at": start.isoformat(),
                "ends_at": end.isoformat(),
                "share": "1.2",
                "months": 1,
            }
            for start, end in campaigns
        ],
        "benefits": benefits or {},
    }


def scheme(**kwargs: Any) -> TierScheme:
    return TierScheme.model_validate(scheme_json(**kwargs))
