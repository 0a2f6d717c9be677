"""MQTT topics: the grammar and keybroker's topic rules (``grammar``), matching and
filter relations (``relations``), and tries for filter sets, subscriptions and retained
messages (``trie``). See docs/topics.md."""

from broker.topics.relations import (
    filter_intersection,
    filter_within,
    filters_overlap,
    levels_match,
    levels_overlap,
    levels_within,
    topic_matches,
)
from broker.topics.trie import FilterSet, RetainedStore, SubscriptionTree
from keystore.topics import (
    HASH,
    MAX_TOPIC_BYTES,
    PLUS,
    device_of,
    device_topic,
    filter_under_prefix,
    is_system,
    is_topic_name,
    is_wildcard,
    parse_filter,
    validate_device_prefix,
    validate_filter,
    validate_topic_name,
)

__all__ = [
    "HASH",
    "MAX_TOPIC_BYTES",
    "PLUS",
    "FilterSet",
    "RetainedStore",
    "SubscriptionTree",
    "device_of",
    "device_topic",
    "filter_intersection",
    "filter_under_prefix",
    "filter_within",
    "filters_overlap",
    "is_system",
    "is_topic_name",
    "is_wildcard",
    "levels_match",
    "levels_overlap",
    "levels_within",
    "parse_filter",
    "topic_matches",
    "validate_device_prefix",
    "validate_filter",
    "validate_topic_name",
]
