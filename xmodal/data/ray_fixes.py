"""A fix for Ray Data's first second of every execution, installed wherever xmodal's pipeline runs.

Ray Data (2.60) sizes each execution from the resources its autoscaling coordinator (a named
actor) reserves for it. The client asks the actor without blocking and answers from a cache that
is empty until the first reply lands, and the resource manager only asks again a second later: for
the first second of every execution (every epoch of every dataset) the global budget is zero and
the operators run one task at a time. Measured on 2 cores, 256 tiles of 128 px decoded per epoch:
the 1.6 s epochs ran a single decode task for their first second (144-158 tiles/s); with the
first reply awaited (2-3 ms once the actor exists), 180-210 tiles/s.

:func:`install` makes the first query of each execution wait for its reply, at most
``FIRST_REPLY_TIMEOUT_S`` (the interval Ray would wait anyway); later queries stay non-blocking.
The module is imported by :mod:`xmodal.data.pipeline`, so every process that unpickles a pipeline
dataset (the driver, Train's split coordinator, a Train worker) installs it before executing it.
Where Ray's internals differ (another version), nothing is patched and Ray behaves as shipped;
``XMODAL_RAY_DATA_FIX=0`` in the environment (which a local Ray's processes inherit) turns it off.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import ray

logger = logging.getLogger(__name__)

FIRST_REPLY_TIMEOUT_S = 1.0
SWITCH = "XMODAL_RAY_DATA_FIX"
_MARK = "_xmodal_first_reply_awaited"


def _await_first_reply(get_reserved_resources: Any) -> Any:
    @functools.wraps(get_reserved_resources)
    def patched(self: Any) -> Any:
        if not getattr(self, _MARK, False):
            setattr(self, _MARK, True)
            if getattr(self, "_pending_reserved_resources", None) is None:
                get_reserved_resources(self)  # sends the first query
            pending = getattr(self, "_pending_reserved_resources", None)
            if pending is not None:
                ray.wait([pending], timeout=FIRST_REPLY_TIMEOUT_S)
        return get_reserved_resources(self)

    patched.__xmodal_patched__ = True  # type: ignore[attr-defined]
    return patched


def install() -> bool:
    """Patch Ray Data's coordinator client (once per process); True when the patch is in place."""
    if os.environ.get(SWITCH, "1") == "0":
        return False
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            DefaultAutoscalingCoordinator,
        )
    except ImportError:
        logger.debug("Ray Data has no DefaultAutoscalingCoordinator: nothing to patch")
        return False
    current = getattr(DefaultAutoscalingCoordinator, "get_reserved_resources", None)
    if current is None:
        return False
    if getattr(current, "__xmodal_patched__", False):
        return True
    DefaultAutoscalingCoordinator.get_reserved_resources = _await_first_reply(current)
    return True
