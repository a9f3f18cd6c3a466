"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
from typing import Self

import aiohttp


async def read_stream(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """Return the body and whether it ended with the final chunk."""
    chunks = []
    try:
        async for chunk in response.content.iter_any():
            chunks.append(chunk)
    except aiohttp.ClientPayloadError:
        return b"".join(chunks), False
    return b"".join(chunks), True


class BackgroundSampler:
    """Runs `_run` as a task for the duration of an `async with` block."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        raise NotImplementedError
