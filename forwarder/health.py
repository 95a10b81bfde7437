"""What keeps this pod from working, by component: the configuration problems ``/readyz`` names.

A step that fails for a reason of this pod's configuration (``errors.Retry.CONFIG``: a topic
missing or refusing records, an authorization refused) reports it here through the retry loop
(``retry.retry``), and clears it when the step succeeds again.  While any problem is held the pod
is not ready, ``forwarder_config_problem{component}`` is 1, and ``/readyz`` says why.
"""

from __future__ import annotations

from forwarder.observability import HEALTH_COMPONENTS, Metrics


class Health:
    """The configuration problems currently held, by component."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self._problems: dict[str, str] = {}

    def fail(self, component: str, reason: str) -> None:
        """``component`` cannot work as configured, because of ``reason`` (already redacted)."""
        self._problems[component] = reason[:500]
        self._set(component, 1)

    def clear(self, component: str) -> None:
        """``component`` works again."""
        if self._problems.pop(component, None) is not None:
            self._set(component, 0)

    @property
    def problems(self) -> dict[str, str]:
        """Every problem held, component -> reason."""
        return dict(self._problems)

    def _set(self, component: str, value: int) -> None:
        if self._metrics is not None and component in HEALTH_COMPONENTS:
            self._metrics.config_problems.labels(component=component).set(value)
