"""Starting or joining Ray: the one place that calls ``ray.init``.

Runs, sweeps and benchmarks all go through :func:`connect`: it joins the cluster named by the
config or ``RAY_ADDRESS``, or starts a local Ray sized to leave CPUs to Ray Data.
"""

from __future__ import annotations

import os
import socket

import ray

from xmodal.engine.console import CONSOLE

# Ray kills an idle task worker after 1 s once a node runs more worker processes than it has CPUs.
# Train's own actors (controller, split coordinator, cleaners...) already exceed that on a small
# machine, so every epoch's Ray Data tasks started in fresh processes, each importing torch again:
# measured on 2 cores, 9 s of every 22 s epoch waiting for data and 8 s per validation pass, against
# 1.6 s and 0.5 s when the workers are kept. Idle workers now live for the length of a long epoch.
IDLE_WORKER_SECONDS = 600

# A local Ray serves one machine: what Ray runs for a cluster's operators only burns cores the
# training step needs (issue 19; ``xmodal bench train`` prints each Ray process's CPU share).
# Train V2 starts a PreemptionWatcher actor with every worker group, polling every 5 s for spot
# nodes being taken away: a local machine has none, and the actor's start delays the first step.
LOCAL_ENVIRONMENT = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Without the dashboard nothing reads Train's metrics: its metric callbacks only cost CPU. (Ray
# core's own metric recording stays on: with ``enable_metrics_collection`` off, 2 of 3 starts on a
# loaded 2-core machine failed, the raylet timing out waiting for the metrics agent's port file.)
WITHOUT_DASHBOARD_ENVIRONMENT = {"RAY_TRAIN_METRICS_ENABLED": "0"}
WITHOUT_DASHBOARD_SYSTEM_CONFIG: dict[str, object] = {}

# The GCS address of the local Ray this process started without the dashboard (no State API).
_local_without_state_api: str | None = None


def placement_group_cleaner_can_work() -> bool:
    """Whether Train V2's PlacementGroupCleaner could do its job on the connected Ray.

    The cleaner (a detached actor per run) asks the State API every second whether the run's
    controller still lives, to free the workers of a controller that died with Ray still up (a
    trial Tune stopped). On a local Ray this process started without the dashboard the State API
    is absent: the cleaner would only start one more process per run and fail a query each
    second, and the workers go with that Ray when this process ends anyway.
    """
    return not (_local_without_state_api and ray.is_initialized() and ray.get_runtime_context().gcs_address == _local_without_state_api)


def quiet_ray_data() -> None:
    """No progress bars and no DataContext dump per execution in logs (epoch lines say enough)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def state_api_available() -> bool:
    """Whether the connected Ray answers State API calls (it needs the dashboard)."""
    try:
        from ray.util.state import list_nodes

        list_nodes(limit=1, timeout=15, raise_on_missing_output=False)
        return True
    except Exception:  # noqa: BLE001 - any failure means "no State API" here
        return False


def train_task_env() -> dict[str, object] | None:
    """The runtime environment of a Ray Train run's processes, as Train V2 sets it.

    Train V2 starts its controller with the driver's Train settings as environment variables
    (``get_env_vars_to_propagate``, and ``RAY_WARN_BLOCKING_GET_INSIDE_ASYNC`` off); its workers,
    and the Ray Data tasks they run, inherit that environment. Ray reuses a worker process only for
    tasks of the same environment, so the decode workers warmed for a run must be started in it.

    Returns:
        ``{"env_vars": ...}``, or None where this Ray has no Train V2 internals of that name (the
        warmed workers then serve the driver's own iterations only).
    """
    try:
        from ray.train.v2._internal.constants import (
            DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
            RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
            get_env_vars_to_propagate,
        )
    except ImportError:
        return None
    env_vars = get_env_vars_to_propagate()
    env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    return {"env_vars": env_vars}


def local_ray_options(dashboard: bool) -> tuple[dict[str, str], dict[str, object]]:
    """What :func:`start_local_ray` sets beside Ray's defaults.

    Returns:
        The environment variables (a value the user set wins; Ray's processes inherit them) and
        Ray's ``_system_config``. Fault tolerance is kept whole: Train's health checks, worker
        restarts and checkpoints do not depend on any of them.
    """
    environment = dict(LOCAL_ENVIRONMENT)
    system_config: dict[str, object] = {"idle_worker_killing_time_threshold_ms": IDLE_WORKER_SECONDS * 1000}
    if not dashboard:
        environment.update(WITHOUT_DASHBOARD_ENVIRONMENT)
        system_config.update(WITHOUT_DASHBOARD_SYSTEM_CONFIG)
    return environment, system_config


def start_local_ray(num_cpus: int, *, dashboard: bool, logging_level: str = "warning") -> None:
    """Start a Ray on this machine only.

    Args:
        num_cpus: Logical CPUs Ray schedules on (may exceed the cores, to leave room for Ray Data
            beside Train workers that each reserve one).
        dashboard: Run the dashboard on 127.0.0.1. Sweeps need it: Train V2's placement-group
            cleaner asks its State API every second whether a run's controller lives, and frees
            the workers of trials Tune stops. It costs CPU: on 2 cores an idle dashboard slowed a
            training step from 0.47 to 0.71 s, so single runs go without it.
        logging_level: Ray's driver log level.
    """
    environment, system_config = local_ray_options(dashboard)
    for name, value in environment.items():
        os.environ.setdefault(name, value)
    kwargs: dict[str, object] = {"include_dashboard": dashboard}
    if not dashboard:
        # The cleaner then warns every second that the State API is unavailable (harmless for a
        # run whose Ray goes away with it); Ray's workers log errors only.
        kwargs["logging_config"] = ray.LoggingConfig(log_level="ERROR")
    else:
        # Point every process of this Ray at its own dashboard: with several local Rays on one
        # machine the cleaner cannot otherwise pick one ("multiple active Ray instances").
        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port)
    global _local_without_state_api
    ray.init(
        num_cpus=num_cpus,
        logging_level=logging_level,
        _system_config=system_config,
        **kwargs,
    )
    _local_without_state_api = None if dashboard else ray.get_runtime_context().gcs_address


def connect(address: str | None, local_cpus: int, *, dashboard: bool) -> bool:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray.

    Returns:
        Whether this call initialised Ray (False when this process was already connected).
    """
    if ray.is_initialized():
        CONSOLE.install()  # this process's Ray may have been started elsewhere (a notebook, a test)
        return False
    global _local_without_state_api
    quiet_ray_data()
    _local_without_state_api = None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="warning")
    else:
        start_local_ray(local_cpus, dashboard=dashboard)
    CONSOLE.install()
    return True
