"""Warnings said once per kind: engines call the connectors, the tier and the
lookup service every step, and a failure that repeats must not flood its log."""

from __future__ import annotations

import logging
from typing import Set


class LogOnce:
    """``once(key, msg, *args)`` logs ``msg`` the first time ``key`` is seen."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._said: Set[str] = set()

    def __call__(self, key: str, msg: str, *args: object, level: int = logging.WARNING) -> None:
        if key not in self._said:
            self._said.add(key)
            self._log.log(level, msg, *args)
