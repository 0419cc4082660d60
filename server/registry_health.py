"""Health follows the protected registry: NOT_SERVING while the engine's index cannot reach it.

A replica out of contact with the shared registry cannot know what was protected since, so it
fails closed: Screen and Protect already answer UNAVAILABLE (RegistryUnavailable) and guarded
generation releases nothing; this watcher also takes it out of load balancers' rotation, and puts
it back once the registry answers again.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)


def registry_probe(engine: Any) -> Callable[[], bool] | None:
    """The engine's index's `registry_available` (memguard.index.api.FingerprintIndex), if it has one."""
    index = getattr(getattr(engine, "index", None), "index", None)
    return getattr(index, "registry_available", None)


class RegistryHealth:
    def __init__(self, engine: Any, set_health: Callable[[bool], Awaitable[None]], interval_s: float = 0.2):
        self.probe, self.set_health, self.interval_s = registry_probe(engine), set_health, interval_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.probe is not None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="registry-health")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        serving = True
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                ok = await asyncio.to_thread(self.probe)
            except Exception:   # noqa: BLE001 - a registry that cannot be checked is not current: fail closed
                if serving:
                    log.exception("checking the protected registry failed")
                ok = False
            if ok != serving:
                serving = ok
                if ok:
                    log.warning("the protected registry answers again: SERVING")
                else:
                    log.error("the protected registry is out of reach: NOT_SERVING (fail closed)")
                await self.set_health(ok)
