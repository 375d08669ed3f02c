"""Scale-out on Ray Serve: engine replicas behind one endpoint, adapter-affinity routing.

Needs the ``ray`` extra (``pip install 'loraplex[ray]'``). Importing this package does not
import Ray; ``build_app`` does, when called.

- ``config.py``: ``RayServeConfig`` (replicas, autoscaling, affinity and its slack), Ray-free.
- ``shared_store.py``: the adapter registry every replica shares on one disk.
- ``asgi_bridge.py``: a forwarded request through the single server's ASGI app.
- ``replica.py``: one engine replica (Serve deployment, multiplexed adapter loads).
- ``affinity.py``: bounded-load adapter affinity, the decision alone, Ray-free.
- ``balancer.py``: the Serve request router that applies it to the replica deployment.
- ``router.py``: the ingress naming each request's adapter for the balancer.
- ``app.py``: ``build_app`` and ``serve_on_ray`` (``loraplex serve --replicas N``).
"""
from __future__ import annotations

from typing import Any


def build_app(*args: Any, **kwargs: Any) -> Any:
    """``loraplex.distributed.app.build_app``: the Ray Serve application."""
    from loraplex.distributed.app import build_app as build

    return build(*args, **kwargs)
