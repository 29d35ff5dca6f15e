"""dynblock: a KV-cache block store for LLM serving engines.

Blocks evicted from GPU memory go to a pinned host tier and an O_DIRECT disk
tier, and come back fast. See README.md.
"""

from __future__ import annotations

import warnings as _warnings

from . import _core
from ._core import (
    AlignmentError,
    CapacityError,
    DynblockError,
    ForkError,
    RemoteError,
    NumaError,
    ODirectError,
    PinError,
    StoreLockedError,
)
from ._env import EnvError
from . import buffers, topology
from .buffers import aligned_empty
from .config import Config, KvLayout
from .disk import DiskStorage
from .host import HostStorage
from .manager import BlockManager, Job, Lease, TierEvent

__version__ = "0.1.0"

if _core.build_profile() != "release":
    _warnings.warn(
        "dynblock was built in debug mode: I/O and copies are much slower; "
        "rebuild with `pip install .` (release) before measuring anything",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = [
    "AlignmentError",
    "BlockManager",
    "CapacityError",
    "Config",
    "DiskStorage",
    "DynblockError",
    "EnvError",
    "ForkError",
    "RemoteError",
    "HostStorage",
    "Job",
    "KvLayout",
    "Lease",
    "NumaError",
    "ODirectError",
    "PinError",
    "StoreLockedError",
    "TierEvent",
    "__version__",
    "aligned_empty",
    "buffers",
    "topology",
]
