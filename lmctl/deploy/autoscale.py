"""The stable track's HorizontalPodAutoscaler (autoscaling/v2) and PodDisruptionBudget (policy/v1).

Scaling is on CPU utilization by default: it needs only metrics-server, which most clusters run.
Scaling on `lmctl_queue_depth` (the better signal for a GPU server, whose CPU idles while it
generates) needs the Prometheus adapter; docs/operations.md shows its rule and the HPA metric.
The disruption budget lets a node drain take one pod at a time (`maxUnavailable: 1`), never all.
"""

from __future__ import annotations

from typing import Any


def autoscaler(app: str, namespace: str, labels: dict[str, str], min_replicas: int, max_replicas: int,
               cpu_percent: int) -> dict[str, Any]:
    """An HPA scaling Deployment `app` between the bounds on average CPU utilization (% of the request)."""
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": app, "namespace": namespace, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": app},
            "minReplicas": min_replicas, "maxReplicas": max_replicas,
            "metrics": [{"type": "Resource",
                         "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": cpu_percent}}}],
            # a new pod loads a model and warms up before it takes traffic: scale down slowly
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}},
        },
    }


def disruption_budget(app: str, namespace: str, labels: dict[str, str], match: dict[str, str],
                      max_unavailable: int) -> dict[str, Any]:
    """A PDB: voluntary disruptions (drains, upgrades) evict at most `max_unavailable` pods at once."""
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": app, "namespace": namespace, "labels": labels},
        "spec": {"maxUnavailable": max_unavailable, "selector": {"matchLabels": match}},
    }
