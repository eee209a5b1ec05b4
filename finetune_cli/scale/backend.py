"""Where compute runs: `--engine local|ray`, checked once, and the connection to a Ray cluster.

`ray_requested` is the one test every command with `--engine` makes; `connected` starts or joins Ray for
`ray_data` (sharded predict and features) and `ray_tune` (trials).
"""

from __future__ import annotations

from contextlib import contextmanager

from finetune_cli.config import SCALE, ScaleConfig
from finetune_cli.errors import SettingsError

ENGINES = ("local", "ray")


def checked_engine(engine: str, address: str | None) -> str:
    """`engine` if it is known and `address` goes with it.

    Raises:
        SettingsError: an unknown engine, or --address without --engine ray.
    """
    if engine not in ENGINES:
        raise SettingsError(f"Expected --engine local or ray. Received: engine={engine!r}")
    if address and engine != "ray":
        raise SettingsError("--address names a Ray cluster: use it with --engine ray")
    return engine


def require_ray():
    """The `ray` module with Ray Data.

    Raises:
        SettingsError: Ray is not installed, naming the extra that installs it.
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise SettingsError("--engine ray needs Ray: pip install 'finetune-cli[ray]'") from None
    return ray


@contextmanager
def connected(address: str | None, settings: ScaleConfig = SCALE):
    """Ray, connected to the cluster at `address`, or to a Ray instance started here (stopped after).

    An already initialised Ray (a caller's own) is used as it is and left running.

    Raises:
        SettingsError: Ray is missing, or no cluster answers at `address`.
    """
    ray = require_ray()
    _quiet_ray_data()
    if ray.is_initialized():
        yield ray
        return
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level="error",
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
    if address:
        _check_answers(address)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:  # "local": a new instance of our own, even when another Ray runs on this machine
            ray.init(address="local", object_store_memory=settings.object_store_mb << 20, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"reach a Ray cluster at --address {address}" if address else "start Ray on this machine"
        raise SettingsError(f"cannot {where}: {str(exc).splitlines()[0]} (start a cluster with `ray start --head`; "
                            "one with token authentication also needs RAY_AUTH_MODE=token here)") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_answers(address: str, timeout: float = 5.0) -> None:
    """Refuse at once a `host:port` where nothing listens (Ray itself would retry for minutes).

    Raises:
        SettingsError: the connection is refused or times out.
    """
    import socket

    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # auto, ray://...: Ray's own lookup and timeouts apply
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise SettingsError(f"nothing answers at --address {address} ({exc.strerror or exc}): start a cluster "
                            "there with `ray start --head`, or leave --address out to start Ray here") from None


def _quiet_ray_data() -> None:
    """Ray Data's per-dataset log lines off the terminal (its log file keeps them): ours show progress."""
    import logging

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def checked_trials(engine: str, address: str | None, max_concurrent: int | None) -> None:
    """Validate the engine options before any work.

    Raises:
        SettingsError: an unknown engine, --address or --max-concurrent without --engine ray,
            --max-concurrent below 1.
    """
    checked_engine(engine, address)
    if max_concurrent is not None and engine != "ray":
        raise SettingsError("--max-concurrent sets how many Ray Tune trials run at once: use it with --engine ray")
    if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
                                       or max_concurrent < 1):
        raise SettingsError(f"Expected --max-concurrent to be a count >= 1. Received: max_concurrent={max_concurrent!r}")


def ray_requested(engine: str, address: str | None) -> bool:
    """True for engine `ray` once Ray is importable; False for `local`.

    Raises:
        SettingsError: an unknown engine, --address without ray, or Ray not installed.
    """
    if checked_engine(engine, address) != "ray":
        return False
    require_ray()
    return True
