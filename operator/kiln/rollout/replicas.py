"""Traffic weights -> replica counts (pure).

Without a mesh (``trafficRouting: ReplicaRatio``) one Service selects the pods of both
Deployments, so each Ready pod gets about the same share of connections and the canary's share
of traffic is ``canary / (canary + stable)`` Ready pods. With ``GatewayAPI`` an HTTPRoute splits
traffic by backend weight and replica counts only size capacity.

Rounding (documented in docs/inferenceservice.md):

- the canary gets ``ceil(total * weight / 100)`` replicas, at least 1 when ``weight > 0``
  (a 1% step of a 3-replica service still runs one canary pod), 0 when ``weight == 0`` or
  ``total == 0`` (a service scaled to zero starts no canary pods);
- ReplicaRatio: the stable keeps all ``total`` replicas until the canary is Ready at the step's
  weight (capacity surges instead of shrinking); once that weight is granted the stable runs
  ``total - canary`` replicas, but at least 1 while the weight is below 100 (so small services
  keep a stable pod: with ``total=1`` a 20% step really serves 50%, and status says so), and 0
  at weight 100;
- GatewayAPI: the stable keeps ``total`` replicas throughout (the route does the split);
- with an HPA the stable's replica count is the HPA's (``None`` here: not set by Kiln).
"""

from __future__ import annotations

from dataclasses import dataclass


def canary_replicas(total: int, weight: int) -> int:
    """Canary pods for ``weight`` percent of a service of ``total`` replicas.

    Args:
        total: replicas of the service at full stable capacity (>= 0).
        weight: canary traffic percentage, 0..100.
    Returns:
        ``0`` if ``weight <= 0`` or ``total <= 0``, else ``max(1, ceil(total * weight / 100))``.
    """
    if weight <= 0 or total <= 0:
        return 0
    return max(1, -(-total * min(weight, 100) // 100))


@dataclass(frozen=True)
class ReplicaSplit:
    """Replica counts of both Deployments and the canary's real share of traffic.

    ``stable`` is None when an HPA owns the stable's replica count. ``canary_share`` is the
    percentage of traffic the canary actually gets (ReplicaRatio: its Ready pods over all serving
    pods, rounded to the nearest integer; GatewayAPI: the route weight).
    """

    stable: int | None
    canary: int
    canary_share: int


def replica_split(
    total: int,
    target_weight: int,
    granted_weight: int,
    *,
    replica_ratio: bool,
    autoscaled: bool = False,
    promoting: bool = False,
    canary_ready: int | None = None,
) -> ReplicaSplit:
    """Replicas of stable and canary for a rollout step.

    Args:
        total: full stable capacity (``spec.replicas``, or the HPA's current count).
        target_weight: the current step's weight: sizes the canary (it scales up first).
        granted_weight: the weight traffic is shifted to now (the step's weight once the
            canary is Ready at it, the previous step's before).
        replica_ratio: True for ReplicaRatio routing, False for GatewayAPI.
        autoscaled: an HPA owns the stable's replicas (``stable`` is then None).
        promoting: the stable is being rolled to the canary's version: keep it at ``total``.
        canary_ready: Ready canary pods now (ReplicaRatio share only; None: assume all Ready).
            Without a mesh every Ready pod takes traffic, so the real share counts them.
    """
    canary = canary_replicas(total, target_weight)
    if not replica_ratio:
        return ReplicaSplit(None if autoscaled else total, canary, max(0, min(100, granted_weight)))
    granted_canary = canary_replicas(total, granted_weight)
    serving = canary if canary_ready is None else max(0, min(canary_ready, canary))
    if autoscaled:
        stable: int | None = None
        stable_count = total
    else:
        if promoting or granted_weight <= 0 or total <= 0:
            stable_count = total
        elif granted_weight >= 100:
            stable_count = 0
        else:
            stable_count = max(1, total - granted_canary)
        stable = stable_count
    share = round(100 * serving / (serving + stable_count)) if serving else 0
    return ReplicaSplit(stable, canary, share)
