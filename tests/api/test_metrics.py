"""/metrics under `serve --workers 2`: one answer per scrape, whichever worker takes it."""

from __future__ import annotations

import re

import pytest
import requests

from tests.api.test_serve import serving

ROUTE = "/.well-known/jwks.json"


def _count(text: str) -> int:
    """The route's request count, whatever order the labels are written in."""
    wanted = {f'route="{ROUTE}"', 'method="GET"', 'status="2xx"'}
    for labels, value in re.findall(r"_duration_seconds_count\{(.*?)\} (\S+)", text):
        if set(labels.split(",")) == wanted:
            return int(float(value))
    return 0


@pytest.mark.slow
def test_every_scrape_sums_the_latency_of_both_workers(db_url: str) -> None:
    with serving("--workers", "2", env={"LEDGER_DATABASE_URL": db_url}) as (url, _):
        for _ in range(40):  # a new connection each, so both workers take some
            assert requests.get(f"{url}{ROUTE}", timeout=30).status_code == 200
        counts = [_count(requests.get(f"{url}/metrics", timeout=30).text) for _ in range(10)]
    assert counts == [40] * 10
