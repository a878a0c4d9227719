"""Which depth and batch size to run next, from the deadlines of the requests that wait.

A pure policy object: no server, no model, no clock of its own (``clock`` is injected, so tests drive time by
hand). A server asks :meth:`DepthPolicy.decide` before every batch, runs the batch at the decided depth
(``with model.scaled(decision.scaling_factor)``) and reports the time it took to :meth:`DepthPolicy.observe`.

:class:`DepthController` is the adaptive rule, a queue-aware form of SuperServe's SlackFit (Khare et al., NSDI
2025) with a cap from the arrival rate: serve the oldest waiting requests, in batches of the depth's most efficient
size, at the largest trained depth at which every waiting request that can still be answered in time is predicted
to be (the queue behind the batch included) and whose capacity serves the recent load.
:class:`FixedDepth` serves every batch at one depth (a fixed ``s``, or the static ``set_budget`` choice), with the
same batching and counters, so policies can be compared on one server.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..budget import LatencyProfile
from ..errors import ConfigError
from ..policy import check_scaling_factor

__all__ = ["ControllerStats", "Decision", "DepthController", "DepthPolicy", "FixedDepth"]

# The arrival rate is counted over the last SLO, and over the latest RATE_SAMPLES arrivals where those span more
# (a relative error of about 1 / sqrt(31), 18%, at any rate: a short window counts a handful of requests at a low
# rate and swings by half); not at all from fewer than RATE_MIN_SAMPLES (two requests a millisecond apart are no
# load). A burst shorter than the SLO is the backlog rule's to handle, not the load cap's.
RATE_SAMPLES = 32
RATE_MIN_SAMPLES = 8

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
        arrival_rate: requests per second that reached the policy lately (:meth:`DepthPolicy.arrival_rate`).
    """

    decisions: int = 0
    batches: dict[float, int] = field(default_factory=dict)
    requests: dict[float, int] = field(default_factory=dict)
    switches: int = 0
    predicted_late: int = 0
    drift: float = 1.0
    arrival_rate: float = 0.0


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
        rate_window_s: arrivals older than this many seconds no longer count in the arrival rate.
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
        rate_window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_positive("slo_ms", slo_ms)
        _check_positive("rate_window_s", rate_window_s)
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
        self._estimates: dict[tuple[float, int], float] = {}  # the profile's, by (s, b)
        self._best: dict[float, int] = {}  # the best batch size per depth, for the decision being made
        self._stats = ControllerStats()
        self._last: float | None = None
        self.rate_window_s = float(rate_window_s)
        self._arrived: deque[float] = deque()  # the arrival times the rate is counted from, oldest first
        self._newest = -math.inf  # the latest arrival counted

    # ------------------------------------------------------------------ prediction
    def predict_ms(self, scaling_factor: float, batch_size: int) -> float:
        """The predicted latency of ``batch_size`` images at ``scaling_factor``."""
        with self._lock:
            return self._predict(check_scaling_factor(scaling_factor), batch_size)

    def _predict(self, s: float, batch_size: int) -> float:
        correction = self._corrections.get((s, batch_size), self._corrections.get((s, None), 1.0))
        return self._profiled(s, batch_size) * self._drift * correction

    def _profiled(self, s: float, batch_size: int) -> float:
        """The profile's estimate, looked up once per depth and batch size (a decision asks for dozens)."""
        base = self._estimates.get((s, batch_size))
        if base is None:
            base = self.profile.estimate(s, batch_size)
            if base is None:
                raise ConfigError(f"the latency profile has no measurement at s={s:g}")
            self._estimates[(s, batch_size)] = base
        return base

    def observe(self, scaling_factor: float, batch_size: int, latency_ms: float) -> None:
        """Learn from a batch served: ``latency_ms`` is the time from the decision to the answers being ready."""
        _check_positive("latency_ms", latency_ms)
        s = check_scaling_factor(scaling_factor)
        with self._lock:
            ratio = latency_ms / self._profiled(s, batch_size)
            rate = self.learning_rate
            self._drift += rate / DRIFT_SLOWDOWN * (ratio - self._drift)
            relative = ratio / self._drift
            for key in ((s, batch_size), (s, None)):
                old = self._corrections.get(key)
                self._corrections[key] = relative if old is None else old + rate * (relative - old)

    # ------------------------------------------------------------------ deciding
    def decide(self, arrivals: Sequence[float], now: float | None = None) -> Decision:
        """The depth and batch size for the next batch.

        Args:
            arrivals: arrival times (``clock`` seconds) of the requests that wait, at least one; the batch is the
                oldest of them, the others wait behind it in arrival order.
            now: the time of the decision (default: ``clock()``).
        """
        if not arrivals:
            raise ConfigError("decide() needs the arrival time of at least one waiting request")
        now = self.clock() if now is None else now
        slacks = sorted(self.slo_ms - (now - a) * 1e3 - self.margin_ms for a in arrivals)
        with self._lock:
            self._best.clear()
            self._count_arrivals(arrivals)
            s = self._choose(slacks, self._rate(now))
            batch = self._batch_size(s, len(slacks))
            decision = Decision(s, batch, self._predict(s, batch), slacks[0])
            stats = self._stats
            stats.decisions += 1
            stats.batches[s] = stats.batches.get(s, 0) + 1
            stats.requests[s] = stats.requests.get(s, 0) + batch
            stats.switches += self._last is not None and s != self._last
            stats.predicted_late += not decision.on_time
            self._last = s
        return decision

    def _choose(self, slacks: list[float], rate: float) -> float:
        """The depth of the next batch, for the waiting requests' ``slacks`` (ms left to their deadlines, less the
        margin, oldest first) and requests arriving at ``rate`` a second (called with the lock held)."""
        raise NotImplementedError

    def _count_arrivals(self, arrivals: Sequence[float]) -> None:
        """Count the arrivals not seen by an earlier decision (a request waits through several of them)."""
        new = sorted(a for a in arrivals if a > self._newest)
        if new:
            self._arrived.extend(new)
            self._newest = new[-1]

    def _rate(self, now: float) -> float:
        """Requests per second lately (called with the lock held): the arrivals of the last SLO, or the latest
        ``RATE_SAMPLES`` over the time from the oldest of them to ``now`` where they span more (so the rate falls
        when arrivals stop); 0 from fewer than ``RATE_MIN_SAMPLES``."""
        arrived, slo_s = self._arrived, self.slo_ms / 1e3
        while arrived and (
            arrived[0] < now - self.rate_window_s or (len(arrived) > RATE_SAMPLES and arrived[0] < now - slo_s)
        ):
            arrived.popleft()
        n = len(arrived)
        if n < RATE_MIN_SAMPLES:
            return 0.0
        span = now - arrived[0]
        return (n - 1) / span if span > slo_s else n / slo_s

    def capacity(self, scaling_factor: float) -> float:
        """Requests per second one worker serves at ``scaling_factor``, at its most efficient batch size."""
        with self._lock:
            self._best.clear()
            return self._capacity(check_scaling_factor(scaling_factor))

    def _capacity(self, s: float) -> float:
        b = self._best_batch(s)
        return b / self._predict(s, b) * 1e3

    def _best_batch(self, s: float) -> int:
        """The batch size, up to ``max_batch_size``, that serves the most requests a second at depth ``s`` (a larger
        batch is not always faster per image: on a CPU it can fall out of the caches)."""
        best = self._best.get(s)
        if best is None:  # once per depth and decision: the corrections change only between decisions
            sizes = {b for b in self.profile.batch_sizes if b < self.max_batch_size} | {self.max_batch_size}
            best = self._best[s] = max(sizes, key=lambda b: (b / self._predict(s, b), b))
        return best

    def _batch_size(self, s: float, waiting: int) -> int:
        """How many of the ``waiting`` requests the next batch at depth ``s`` takes: all, up to its best batch."""
        return min(waiting, self._best_batch(s))

    def _plan(self, s: float, n: int) -> tuple[list[range], list[float]]:
        """The batches that serve ``n`` waiting requests, oldest first, at depth ``s`` (request indices) and when
        each is predicted to be answered, if every one of them runs at ``s``."""
        b = self._batch_size(s, n)
        batches = [range(start, min(start + b, n)) for start in range(0, n, b)]
        full, last = self._predict(s, b), self._predict(s, len(batches[-1]))
        finish = [full * j + (last if j == len(batches) - 1 else full) for j in range(len(batches))]
        return batches, finish

    def stats(self) -> ControllerStats:
        """A snapshot of the counters."""
        with self._lock:
            s = self._stats
            return ControllerStats(
                s.decisions, dict(s.batches), dict(s.requests), s.switches, s.predicted_late, self._drift,
                self._rate(self.clock()),
            )  # fmt: skip


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

    def _choose(self, slacks: list[float], rate: float) -> float:
        return self.scaling_factors[0]


class DepthController(DepthPolicy):
    """The adaptive depth: the largest depth that keeps every savable waiting request on time, without flapping.

    Before every batch, with the waiting requests served oldest first in batches of ``b`` (as many as wait, up to
    the depth's most efficient batch size within ``max_batch_size``), each batch predicted to take the profiled
    latency at its size, and a request's slack its time left to its deadline (less ``margin_ms``):

    1. a request is *savable* if it is predicted on time when the whole queue runs at the smallest depth; the
       target is the largest depth at which every savable request is still predicted on time. The queue behind
       the batch counts: a backlog of several batches lowers the depth before its last requests are lost, where
       a rule that looked at the oldest request alone would serve the batch at full depth and leave the backlog
       to the next ones. A request that is late at every depth does not hold the depth down; if the oldest one
       is such a lost cause the batch runs at the smallest depth (the fastest way past it; the decision counts
       as predicted late);
    2. the load caps the target: at most the largest depth whose capacity (requests per second at its most
       efficient batch size, from the corrected predictions) serves the recent arrival rate (over the last SLO,
       or the latest ``RATE_SAMPLES`` arrivals where they span more). The slack rule alone sees only the
       requests that wait, so under a load above the full depth's capacity it keeps the full depth until the
       backlog is already too long for any depth to work off in time; the cap lowers the depth as the load
       outgrows it. A load no depth can serve gets the smallest;
    3. a target below the current depth is taken at once (a deadline is at stake);
    4. a target above it is approached one trained depth at a time, and only after ``patience`` decisions in a
       row in which the next depth up keeps the savable requests on time and serves the arrival rate with
       ``headroom`` to spare (predicted answers at most ``(1 - headroom)`` of their slack, capacity at least
       ``1 / (1 - headroom)`` times the rate). This is the hysteresis: a slack or a load that hovers around a
       threshold does not make the depth flap.

    The slack rule assumes the queue runs at one depth and that no request arrives before it is served; the
    load cap that arrivals go on at the recent rate. Both err towards a lower depth under rising load, and the
    next decision looks again.

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

    def _choose(self, slacks: list[float], rate: float) -> float:
        depths, n = self.scaling_factors, len(slacks)
        batches, fastest = self._plan(depths[0], n)
        savable = [slacks[k] >= f for batch, f in zip(batches, fastest, strict=True) for k in batch]
        first = [n] * (n + 1)  # the first savable request at or after each one: slacks grow, so a batch's tightest
        for k in reversed(range(n)):
            first[k] = k if savable[k] else first[k + 1]

        def keeps(s: float, share: float = 1.0) -> bool:  # every savable request on time, the load served
            plan = zip(*self._plan(s, n), strict=True)
            on_time = all(first[b.start] >= b.stop or f <= share * slacks[first[b.start]] for b, f in plan)
            return on_time and share * self._capacity(s) >= rate

        lost = not savable[0]  # the oldest is late at every depth
        target = 0 if lost else next((i for i in reversed(range(len(depths))) if keeps(depths[i])), 0)
        if target < self._level:
            self._level, self._rises = target, 0
        elif target > self._level:
            up = depths[self._level + 1]
            self._rises = self._rises + 1 if keeps(up, 1 - self.headroom) else 0
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
