"""Per-message limits (docs/limits.md), pure: topic size and depth, the publish rate."""

from __future__ import annotations


def topic_limit_problem(topic: str, max_bytes: int, max_levels: int) -> str | None:
    """Why a PUBLISH topic or SUBSCRIBE filter is over the configured limits, or None."""
    size = len(topic.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return f"{size} bytes, limit {max_bytes}"
    levels = topic.count("/") + 1
    if levels > max_levels:
        return f"{levels} levels, limit {max_levels}"
    return None


def take_token(bucket: tuple[float, float] | None, rate: float,
               now: float) -> tuple[bool, tuple[float, float]]:
    """A token bucket of ``rate`` per second with bursts of one second's worth:
    (allowed, the bucket to keep). ``bucket`` is (tokens, time of the last take)."""
    tokens, last = bucket or (rate, now)
    tokens = min(rate, tokens + (now - last) * rate) - 1
    return tokens >= 0, (tokens, now)
