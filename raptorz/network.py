"""Where the processes raptorz starts listen: this machine only, unless asked.

A Dask scheduler runs any function a connected client sends, and a nanny or a worker
runs what its scheduler sends: whoever reaches one of their ports runs code as the user.
Every local cluster therefore listens on loopback; listening elsewhere is an explicit
choice (a ``host``, a dashboard address with a host) and is said in one
:class:`~raptorz.errors.RaptorzWarning` naming who can then reach it. Batch clusters,
which their jobs must reach over the network, use TLS (:mod:`raptorz.batch`).
"""

from __future__ import annotations

import ipaddress
import socket
import warnings
from typing import Any, Final

from distributed import Client

from raptorz.errors import RaptorzWarning

#: Where local clusters and every dashboard listen unless asked otherwise.
LOOPBACK: Final = "127.0.0.1"
#: Where the dashboard listens unless asked otherwise: ``127.0.0.1:8787``
#: (:func:`dashboard_options`).
DEFAULT_DASHBOARD: Final = ":8787"
_EVERY_INTERFACE: Final = ("", "0.0.0.0", "::", "*")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen_host(host: str | None) -> str:
    """The host the scheduler, nannies and workers of a local cluster listen on.

    ``None`` is :data:`LOOPBACK`; any other host than loopback is warned about.
    """
    if host is None:
        return LOOPBACK
    if not is_loopback(host):
        warnings.warn(
            f"the Dask scheduler and workers listen on {_where(host)}, without "
            "authentication: anyone who can reach this machine there can run code as you",
            RaptorzWarning, stacklevel=3)
    return host


def dashboard_options(address: str | None) -> dict[str, Any]:
    """The scheduler's keywords for the dashboard at ``address`` (``None``: none).

    ``":PORT"`` (or ``"PORT"``) is ``127.0.0.1:PORT``, unlike Dask, where it means every
    interface; ``"HOST:PORT"`` is taken as given, and warned about unless ``HOST`` is
    loopback. The scheduler serves HTTP (health checks) even without a dashboard: then
    on a free port of loopback, never on the dashboard's.
    """
    if address is None:
        return {"dashboard": False, "dashboard_address": f"{LOOPBACK}:0"}
    host, _, port = address.rpartition(":")
    if not host:
        host = LOOPBACK
    elif not is_loopback(host):
        warnings.warn(
            f"the Dask dashboard listens on {_where(host)}, port {port}: anyone who can "
            "reach it sees the tasks, the workers and their logs",
            RaptorzWarning, stacklevel=3)
    return {"dashboard": True, "dashboard_address": f"{host}:{port}"}


def _where(host: str) -> str:
    return f"{host} (every interface)" if host in _EVERY_INTERFACE else host


def dashboard_link(client: Client) -> str | None:
    """The dashboard's address as its scheduler listens on it; ``None`` where it has none.

    Unlike ``client.dashboard_link`` (the scheduler's host with the dashboard's port),
    this is the socket the dashboard is bound to; one bound to every interface is given
    by this machine's name, and said.
    """
    bound = client.run_on_scheduler(_bound_dashboard)
    if bound is None:
        return None
    host, port = bound
    if host in _EVERY_INTERFACE:
        return f"http://{socket.gethostname()}:{port}/status (listening on every interface)"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/status"


def _bound_dashboard(dask_scheduler: Any) -> tuple[str, int] | None:
    served = getattr(dask_scheduler, "http_application", None)
    if not any("/status" in getattr(app, "app_paths", ()) for app in
               getattr(served, "applications", ())):  # Bokeh's, where the dashboard is on
        return None
    return str(dask_scheduler.http_server.address), int(dask_scheduler.http_server.port)
