"""Which depth and batch size to run next, from the deadlines of the requests that wait.

A pure policy object: no server, no model, no clock of its own (``clock`` is injected, so tests drive time by
hand). A server asks :meth:`DepthPolicy.decide` before every batch, runs the batch at the decided depth
(``with model.scaled(decision.scaling_factor)``) and reports the time it took to :meth:`DepthPolicy.observe`.

:class:`DepthController` is the adaptive rule (SuperServe's SlackFit, Khare et al., NSDI 2025): serve the waiting
requests, up to the largest batch, at the largest trained depth whose predicted latency still meets the oldest
request's remaining slack. :class:`FixedDepth` serves every batch at one depth (a fixed ``s``, or the static
``set_budget`` choice), with the same batching and counters, so policies can be compared on one server.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..budget import LatencyProfile
from ..errors import ConfigError
from ..policy import check_scaling_factor

__all__ = ["ControllerStats", "Decision", "DepthController", "DepthPolicy", "FixedDepth"]

# The machine-wide drift learns this many times slower than the per-depth corrections: depths served in turn with
# different errors then move it only a little, while a lasting slow-down still reaches every depth.
DRIFT_SLOWDOWN = 4


@dataclass(frozen=True)
class Decision:
    """What to run next.

    Args:
        scaling_factor: the depth of the batch.
        batch_size: how many of the oldest waiting requests go into it.
        predicted_ms: the batch's predicted latency (profile times learned correction).
        slack_ms: the time left to the oldest request's deadline, less the margin.
    """

    scaling_factor: float
    batch_size: int
    predicted_ms: float
    slack_ms: float

    @property
    def on_time(self) -> bool:
        """Whether the batch is predicted to answer the oldest request before its deadline."""
        return self.predicted_ms <= self.slack_ms


@dataclass
class ControllerStats:
    """Counters of what a policy chose (a snapshot: later decisions do not change it).

    Args:
        decisions: batches decided.
        batches: batches per depth.
        requests: requests per depth (the sum of the decided batch sizes).
        switches: decisions whose depth differs from the previous one.
        predicted_late: decisions where no depth was predicted to meet the oldest request's deadline.
        drift: the learned ratio of observed to profiled latency, over every depth and batch size.
    """

    decisions: int = 0
    batches: dict[float, int] = field(default_factory=dict)
    requests: dict[float, int] = field(default_factory=dict)
    switches: int = 0
    predicted_late: int = 0
    drift: float = 1.0


class DepthPolicy:
    """What every policy shares: the latency prediction that learns from observed batches, and the counters.

    A batch's latency is predicted as ``profile.estimate(s, b) * drift * correction(s, b)``: ``drift`` follows the
    whole machine (every observed batch updates it, so a load that slows everything down is seen at depths not run
    lately too), ``correction(s, b)`` what the profile got wrong at that depth and batch size (the depth's own
    correction where that batch size was never observed). Both are exponentially weighted moving averages, the
    drift a slower one.
    Thread-safe: every method holds the policy's lock.

    Args:
        profile: latency per depth and batch size, measured on the device that serves
            (:meth:`~adaptive_depth.AdaptiveDepth.profile`; check it with ``profile.check_device`` first).
        slo_ms: the latency objective: a request's deadline is its arrival plus ``slo_ms``.
        scaling_factors: the depths to choose from (default: every depth of the profile).
        max_batch_size: the most requests in one batch (default: the largest profiled batch size).
        margin_ms: time reserved for what the observed latency does not cover (moving answers to the client).
        learning_rate: weight of each new observation in the moving averages, in (0, 1].
        clock: seconds, the clock the arrival times come from (default ``time.monotonic``).
    """

    def __init__(
        self,
        profile: LatencyProfile,
        slo_ms: float,
        *,
        scaling_factors: Sequence[float] | None = None,
        max_batch_size: int | None = None,
        margin_ms: float = 0.0,
        learning_rate: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_positive("slo_ms", slo_ms)
        if isinstance(margin_ms, bool) or not isinstance(margin_ms, int | float) or not 0 <= margin_ms < slo_ms:
            raise ConfigError(f"margin_ms must be a number in [0, slo_ms={slo_ms}), got {margin_ms!r}")
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, int | float) or not 0 < learning_rate <= 1:
            raise ConfigError(f"learning_rate must be in (0, 1], got {learning_rate!r}")
        depths = sorted({check_scaling_factor(s) for s in scaling_factors or _profiled_depths(profile)})
        missing = [s for s in depths if profile.estimate(s, 1) is None]
        if not depths or missing:
            raise ConfigError(
                f"the latency profile has no measurement of the depths {missing or depths}: profile them "
                "(model.profile(batch_size=[1, 2, 4, 8])) on the serving device first"
            )
        if max_batch_size is None:
            max_batch_size = profile.batch_sizes[-1]
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        self.profile = profile
        self.slo_ms = float(slo_ms)
        self.scaling_factors = depths
        self.max_batch_size = max_batch_size
        self.margin_ms = float(margin_ms)
        self.learning_rate = float(learning_rate)
        self.clock = clock
        self._lock = threading.Lock()
        self._drift = 1.0
        self._corrections: dict[tuple[float, int | None], float] = {}  # (s, b) and (s, None): per depth
        self._stats = ControllerStats()
        self._last: float | None = None

    # ------------------------------------------------------------------ prediction
    def predict_ms(self, scaling_factor: float, batch_size: int) -> float:
        """The predicted latency of ``batch_size`` images at ``scaling_factor``."""
        with self._lock:
            return self._predict(check_scaling_factor(scaling_factor), batch_size)

    def _predict(self, s: float, batch_size: int) -> float:
        base = self.profile.estimate(s, batch_size)
        if base is None:
            raise ConfigError(f"the latency profile has no measurement at s={s:g}")
        correction = self._corrections.get((s, batch_size), self._corrections.get((s, None), 1.0))
        return base * self._drift * correction

    def observe(self, scaling_factor: float, batch_size: int, latency_ms: float) -> None:
        """Learn from a batch served: ``latency_ms`` is the time from the decision to the answers being ready."""
        _check_positive("latency_ms", latency_ms)
        s = check_scaling_factor(scaling_factor)
        base = self.profile.estimate(s, batch_size)
        if base is None:
            raise ConfigError(f"the latency profile has no measurement at s={s:g}")
        ratio = latency_ms / base
        rate = self.learning_rate
        with self._lock:
            self._drift += rate / DRIFT_SLOWDOWN * (ratio - self._drift)
            relative = ratio / self._drift
            for key in ((s, batch_size), (s, None)):
                old = self._corrections.get(key)
                self._corrections[key] = relative if old is None else old + rate * (relative - old)

    # ------------------------------------------------------------------ deciding
    def decide(self, arrivals: Sequence[float], now: float | None = None) -> Decision:
        """The depth and batch size for the next batch.

        Args:
            arrivals: arrival times (``clock`` seconds) of the requests that wait, at least one.
            now: the time of the decision (default: ``clock()``).
        """
        if not arrivals:
            raise ConfigError("decide() needs the arrival time of at least one waiting request")
        now = self.clock() if now is None else now
        batch = min(len(arrivals), self.max_batch_size)
        slack_ms = self.slo_ms - (now - min(arrivals)) * 1e3 - self.margin_ms
        with self._lock:
            s = self._choose(batch, slack_ms)
            decision = Decision(s, batch, self._predict(s, batch), slack_ms)
            stats = self._stats
            stats.decisions += 1
            stats.batches[s] = stats.batches.get(s, 0) + 1
            stats.requests[s] = stats.requests.get(s, 0) + batch
            stats.switches += self._last is not None and s != self._last
            stats.predicted_late += not decision.on_time
            self._last = s
        return decision

    def _choose(self, batch_size: int, slack_ms: float) -> float:
        """The depth of the next batch (called with the lock held)."""
        raise NotImplementedError

    def stats(self) -> ControllerStats:
        """A snapshot of the counters."""
        with self._lock:
            s = self._stats
            return ControllerStats(
                s.decisions, dict(s.batches), dict(s.requests), s.switches, s.predicted_late, self._drift
            )


class FixedDepth(DepthPolicy):
    """Every batch at one depth (``scaling_factor``); batching, prediction and counters as the controller's.

    Args:
        profile, slo_ms: as :class:`DepthPolicy` (the SLO only feeds the counters of predicted misses).
        scaling_factor: the depth of every batch.
        **kwargs: the other arguments of :class:`DepthPolicy`.
    """

    def __init__(self, profile: LatencyProfile, slo_ms: float, scaling_factor: float, **kwargs) -> None:
        s = check_scaling_factor(scaling_factor)
        super().__init__(profile, slo_ms, scaling_factors=[s], **kwargs)

    def _choose(self, batch_size: int, slack_ms: float) -> float:
        return self.scaling_factors[0]


class DepthController(DepthPolicy):
    """The adaptive depth: the largest depth that meets the oldest waiting request's deadline, without flapping.

    Before every batch, with ``b`` = the waiting requests up to ``max_batch_size`` and ``slack`` = the oldest one's
    time left to its deadline (less ``margin_ms``):

    1. the target is the largest depth whose predicted latency at batch ``b`` is at most ``slack``; if none is,
       the smallest depth (the fastest answer; the decision counts as predicted late);
    2. a target below the current depth is taken at once (a deadline is at stake);
    3. a target above it is approached one trained depth at a time, and only after ``patience`` decisions in a
       row in which the next depth up fits with ``headroom`` to spare (predicted latency at most
       ``(1 - headroom) * slack``). This is the hysteresis: a slack that hovers around a threshold does not make
       the depth flap.

    Args:
        profile, slo_ms: as :class:`DepthPolicy`.
        patience: decisions in a row before a step up.
        headroom: the fraction of the slack a step up must leave unused, in [0, 1).
        **kwargs: the other arguments of :class:`DepthPolicy`.
    """

    def __init__(
        self, profile: LatencyProfile, slo_ms: float, *, patience: int = 3, headroom: float = 0.2, **kwargs
    ) -> None:
        super().__init__(profile, slo_ms, **kwargs)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"patience must be a positive integer, got {patience!r}")
        if isinstance(headroom, bool) or not isinstance(headroom, int | float) or not 0 <= headroom < 1:
            raise ConfigError(f"headroom must be in [0, 1), got {headroom!r}")
        self.patience = patience
        self.headroom = float(headroom)
        self._level = len(self.scaling_factors) - 1  # index of the current depth: start at the largest
        self._rises = 0  # decisions in a row that allowed a step up

    @property
    def scaling_factor(self) -> float:
        """The depth the controller is at now."""
        with self._lock:
            return self.scaling_factors[self._level]

    def _choose(self, batch_size: int, slack_ms: float) -> float:
        depths = self.scaling_factors
        fitting = [i for i, s in enumerate(depths) if self._predict(s, batch_size) <= slack_ms]
        target = fitting[-1] if fitting else 0
        if target < self._level:
            self._level, self._rises = target, 0
        elif target > self._level:
            up = depths[self._level + 1]
            self._rises = self._rises + 1 if self._predict(up, batch_size) <= (1 - self.headroom) * slack_ms else 0
            if self._rises >= self.patience:
                self._level, self._rises = self._level + 1, 0
        else:
            self._rises = 0
        return depths[self._level]


def _profiled_depths(profile: LatencyProfile) -> list[float]:
    return sorted({float(key) for row in profile.latency_ms.values() for key in row})


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
