"""The README's asyncio examples run as written, against a real `soldout serve` process:
the `asyncio.run` program, and the FastAPI app whose lifespan opens the client (its
lifespan entered as an ASGI server enters it, its requests made in-process by httpx)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from client_flavours import ServerProcess, serve
from wire_helpers import ADMIN_TOKEN, REPOSITORY

from protocol.aio import open_client

SKU = "MI-BAND-1"
README_URL = "ws://127.0.0.1:8765/v1"


def readme_example(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPOSITORY / "README.md").read_text(), re.DOTALL)
    (block,) = [block for block in blocks if containing in block]
    return block


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    for running in serve(tmp_path):
        asyncio.run(put_sku(running.url))
        yield running


async def put_sku(url: str) -> None:
    async with open_client(url, ADMIN_TOKEN) as admin:
        assert (await admin.put_sku(SKU, stock=10, per_buyer_limit=2)).status == "ok"


def run_example(source: str, url: str) -> dict[str, Any]:
    assert README_URL in source
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(source.replace(README_URL, url), "README.md", "exec"), namespace)
    return namespace


def test_the_asyncio_run_example_reserves_and_confirms(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    run_example(readme_example("asyncio.run(main())"), server.url)
    reservation_line, confirm_line = capsys.readouterr().out.splitlines()
    assert reservation_line.split()[2] == "9"  # the units that remain
    assert confirm_line.startswith("Reply(status='ok'")


async def requests_to(app: Any) -> list[httpx.Response]:
    # The app's lifespan as its ASGI server runs it, around requests made in-process.
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://frontend") as http,
    ):
        return [
            await http.post(f"/reserve/{SKU}", params={"buyer": "u7", "key": "u7-attempt-1"}),
            await http.post(f"/reserve/{SKU}", params={"buyer": "u7", "key": "u7-attempt-1"}),
            await http.post(f"/reserve/{SKU}", params={"buyer": "u8"}),
            await http.post("/reserve/NOPE", params={"buyer": "u8"}),
        ]


def test_the_fastapi_example_reserves_through_the_client_of_its_lifespan(server: ServerProcess) -> None:
    app = run_example(readme_example("FastAPI(lifespan=lifespan)"), server.url)["app"]
    first, again, other, unknown = asyncio.run(requests_to(app))
    assert [response.status_code for response in (first, again, other, unknown)] == [200] * 4
    assert first.json()["status"] == "ok"
    # The same key returns the same hold.
    assert again.json() == first.json()
    assert other.json()["status"] == "ok"
    assert other.json()["reservation"] != first.json()["reservation"]
    assert unknown.json() == {"status": "unknown_sku", "reservation": None, "expires_at": None}
