"""The advanced key query (list_keys), compiled to SQL and run on each backend (a real SQLite
file, a real PostgreSQL database)."""

# ruff: noqa: S608

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keystore import KeyStore, ValidationError, compile_query
from keystore.postgres.dialect import POSTGRES as POSTGRES_SPELLING
from keystore.query import ALL_OPERATORS, FIELDS, POSTGRES
from keystore.sql.statements import render
from keystore.sqlite.dialect import SQLITE
from keystore.sqlite.migrations import MIGRATIONS
from tests.support.postgres import PostgresServer


@pytest.fixture
async def ks(keystore_target: str) -> AsyncIterator[KeyStore]:
    """Five keys with distinct attributes, named alpha..echo."""
    async with KeyStore.open(keystore_target) as store:
        await store.upsert_devices(
            [("d1", None, ["floor=1"]), ("d2", None, []), ("gw-9", None, [])]
        )
        await store.create_key(
            name="alpha",
            description="Front door",
            device_ids=["d1", "d2"],
            topic_mode="only",
            pub_topics=["alerts/fire"],
            sub_topics=["cmd/#"],
            expires_at="2030-01-01T00:00:00Z",
        )
        await store.create_key(
            name="bravo",
            device_tags=["floor=1", "kind=gw"],
            address_mode="only",
            addresses=["10.0.0.0/8"],
            expires_at="2031-06-01T00:00:00Z",
        )
        await store.create_key(
            name="charlie",
            description="back door",
            device_ids=["gw-9"],
            topic_mode="except",
            pub_topics=["a*b/c"],
            address_mode="except",
            addresses=["2001:db8::/32"],
        )
        delta, _ = await store.create_key(name="delta", topic_mode="all")
        await store.create_key(name=None, description="unnamed key")
        await store.set_status([delta.key], "inactive")
        yield store


async def names(ks: KeyStore, query: Any) -> list[str | None]:
    return [k.name for k in await ks.list_keys(query)]


ALL = ["alpha", "bravo", "charlie", "delta", None]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (None, ALL),
        ({}, ALL),
        ("", ALL),
        # implicit $eq, and several members ANDed
        ({"name": "bravo"}, ["bravo"]),
        ({"status": "inactive"}, ["delta"]),
        ({"status": "active", "filterType": "whitelist"}, ["alpha"]),
        # $eq/$ne with null: a missing value
        ({"name": None}, [None]),
        ({"description": {"$ne": None}}, ["alpha", "charlie", None]),
        (
            {"name": {"$ne": "alpha"}},
            ["bravo", "charlie", "delta", None],
        ),  # null counts as "not equal"
        ({"name": {"$eq": "alpha"}}, ["alpha"]),
        # ordering operators compare text by code point
        ({"name": {"$gt": "bravo"}}, ["charlie", "delta"]),
        ({"name": {"$gte": "bravo", "$lt": "delta"}}, ["bravo", "charlie"]),
        ({"name": {"$lte": "alpha"}}, ["alpha"]),
        ({"name": {"$in": ["alpha", "delta", "zulu"]}}, ["alpha", "delta"]),
        ({"name": {"$in": ["alpha", None]}}, ["alpha", None]),
        ({"name": {"$nin": ["alpha", "delta"]}}, ["bravo", "charlie", None]),
        ({"name": {"$nin": ["alpha", None]}}, ["bravo", "charlie", "delta"]),
        ({"name": {"$in": []}}, []),
        # pattern operators are case-sensitive and treat the value literally
        ({"description": {"$startsWith": "Front"}}, ["alpha"]),
        ({"description": {"$startsWith": "front"}}, []),
        ({"description": {"$endsWith": "door"}}, ["alpha", "charlie"]),
        ({"description": {"$contains": "k d"}}, ["charlie"]),
        ({"description": {"$like": "*door"}}, ["alpha", "charlie"]),
        ({"description": {"$like": "?ack*"}}, ["charlie"]),
        ({"name": {"$like": "*"}}, ["alpha", "bravo", "charlie", "delta"]),
        ({"description": {"$contains": "%"}}, []),
        ({"description": {"$contains": "_"}}, []),
        ({"pubTopics": {"$contains": "*"}}, ["charlie"]),  # '*' literal outside $like
        ({"pubTopics": {"$like": "a[*]b*"}}, []),  # '[' is literal, not a glob class
        # enums accept Losant names and ours
        ({"filterType": "blacklist"}, ["charlie"]),
        ({"filterType": "except"}, ["charlie"]),
        ({"filterType": {"$in": ["all", "none"]}}, ["bravo", "delta", None]),
        ({"addressFilterType": {"$ne": "all"}}, ["bravo", "charlie"]),
        ({"allDevices": True}, ["delta", None]),
        # list fields: ANY element satisfies
        ({"deviceIds": "d2"}, ["alpha"]),
        ({"deviceIds": {"$startsWith": "gw-"}}, ["charlie"]),
        ({"deviceIds": {"$in": ["d1", "gw-9"]}}, ["alpha", "charlie"]),
        ({"deviceTags": "floor=1"}, ["bravo"]),
        ({"deviceTags": {"$startsWith": "kind="}}, ["bravo"]),
        ({"deviceTags": {"$gt": "j"}}, ["bravo"]),
        ({"subTopics": {"$endsWith": "/#"}}, ["alpha"]),
        ({"addresses": {"$contains": ":"}}, ["charlie"]),
        ({"addresses": "10.0.0.0/8"}, ["bravo"]),
        # negated list operators: NO element matches (empty lists qualify)
        ({"deviceIds": {"$ne": "d1"}}, ["bravo", "charlie", "delta", None]),
        ({"deviceIds": {"$nin": ["d1", "gw-9"]}}, ["bravo", "delta", None]),
        ({"pubTopics": []}, ["bravo", "delta", None]),
        ({"pubTopics": {"$ne": []}}, ["alpha", "charlie"]),
        # dates: ISO strings, an offset-less string is UTC
        ({"expirationDate": {"$gt": "2030-06-01T00:00:00Z"}}, ["bravo"]),
        ({"expirationDate": {"$lte": "2030-01-01"}}, ["alpha"]),
        ({"expirationDate": "2030-01-01T01:00:00+01:00"}, ["alpha"]),
        ({"expirationDate": None}, ["charlie", "delta", None]),
        ({"expirationDate": {"$in": ["2031-06-01T00:00:00Z"]}}, ["bravo"]),
        ({"lastUsed": None}, ALL),
        ({"creationDate": {"$lt": "2000-01-01T00:00:00Z"}}, []),
        # logical operators
        ({"$or": [{"name": "alpha"}, {"status": "inactive"}]}, ["alpha", "delta"]),
        ({"$and": [{"name": {"$gte": "b"}}, {"name": {"$lt": "d"}}]}, ["bravo", "charlie"]),
        ({"$nor": [{"name": "alpha"}, {"name": None}]}, ["bravo", "charlie", "delta"]),
        (
            {
                "$or": [
                    {"$and": [{"status": "active"}, {"deviceTags": "kind=gw"}]},
                    {"$nor": [{"allDevices": False}, {"name": None}]},
                ]
            },
            ["bravo", "delta"],
        ),
        ({"status": "active", "$or": [{"name": "delta"}, {"name": "alpha"}]}, ["alpha"]),
        # a JSON string works like the dict
        ('{"deviceTags": {"$startsWith": "floor="}}', ["bravo"]),
    ],
)
async def test_query(ks: KeyStore, query: Any, expected: list[str | None]) -> None:
    assert await names(ks, query) == expected


async def test_query_on_key_and_dates_relative_to_now(ks: KeyStore) -> None:
    alpha = (await ks.list_keys({"name": "alpha"}))[0]
    assert await names(ks, {"key": {"$startsWith": alpha.key[:8]}}) == ["alpha"]
    assert await names(ks, {"id": alpha.id}) == ["alpha"]
    soon = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert await names(ks, {"creationDate": {"$lt": soon}}) == ALL
    assert await names(ks, {"lastUpdated": {"$gte": alpha.updated_at.isoformat()}}) != []
    await ks.mark_keys_used([alpha.key], datetime(2030, 1, 1, tzinfo=UTC))
    assert await names(ks, {"lastUsed": {"$ne": None}}) == ["alpha"]


@pytest.mark.parametrize(
    "attack",
    [
        "alpha' OR '1'='1",
        "x'); DROP TABLE access_keys; --",
        '" OR 1=1 --',
    ],
)
async def test_injection_is_a_plain_value(ks: KeyStore, attack: str) -> None:
    for query in (
        {"name": attack},
        {"deviceIds": attack},
        {"name": {"$like": attack}},
        {"description": {"$contains": attack}},
        {"name": {"$in": [attack]}},
    ):
        assert await names(ks, query) == []
    assert await ks.count_keys() == 5
    sql, params = compile_query({"name": attack})
    assert attack not in sql and params == [attack]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"colour": "red"}, "unknown query field 'colour'"),
        ({"name; DROP TABLE x": 1}, "unknown query field"),
        ({"name": {"$regex": "a.*"}}, "unknown query operator '\\$regex' on field 'name'"),
        ({"$where": "1"}, "unknown query operator '\\$where'"),
        ({"$or": {"name": "a"}}, "invalid \\$or .*expected a non-empty list"),
        ({"$and": []}, "non-empty list"),
        ({"$or": ["name"]}, "expected a JSON object"),
        ({"name": {}}, "empty operator object"),
        ({"name": 5}, "invalid \\$eq value 5 for 'name': expected a string"),
        ({"name": {"$gt": None}}, "expected a string"),
        ({"name": {"$in": "alpha"}}, 'invalid \\$in value "alpha" .* expected a list'),
        ({"status": "paused"}, "invalid \\$eq value \"paused\" for 'status': expected one of"),
        (
            {"status": {"$startsWith": "act"}},
            "operator '\\$startsWith' does not apply to field 'status'",
        ),
        ({"allDevices": "yes"}, "expected true or false"),
        ({"addressFilterType": "none"}, "expected one of"),
        ({"expirationDate": {"$gt": "next week"}}, "not an ISO-8601 date"),
        ({"expirationDate": {"$gt": 1700000000}}, "expected an ISO-8601 date string"),
        ({"expirationDate": {"$contains": "2030"}}, "does not apply"),
        ({"deviceIds": None}, "null for list field 'deviceIds'"),
        ({"deviceIds": {"$gt": 3}}, "expected a string"),
        ("{not json", "invalid query JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
async def test_bad_query_is_refused(ks: KeyStore, query: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        await ks.list_keys(query)
    assert "\n" not in str(info.value)


def test_query_depth_and_size_are_bounded() -> None:
    deep: dict[str, Any] = {"name": "x"}
    for _ in range(40):
        deep = {"$and": [deep]}
    with pytest.raises(ValidationError, match="nested deeper"):
        compile_query(deep)
    with pytest.raises(ValidationError, match="query too large"):
        compile_query({"name": {"$in": [str(i) for i in range(20_000)]}})


def test_compiled_sql_uses_only_whitelisted_text() -> None:
    sql, params = compile_query(json.dumps({"deviceTags": {"$startsWith": "a*"}}))
    assert "GLOB ?" in sql and params == ["a[*]*"]
    sql, params = compile_query({"name": {"$contains": "5%_\\"}}, POSTGRES, ["app"])
    assert "LIKE $2" in sql and params == ["app", "%5\\%\\_\\\\%"]


# --- fuzz: any JSON either compiles to SQL SQLite accepts, or is a ValidationError -------

_fields = st.sampled_from([*FIELDS, "bogus", "$and", "$or", "$nor", "$where"])
_ops = st.sampled_from([*ALL_OPERATORS, "$regex", "$exists"])
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.sampled_from(["2030-01-01", "active", "whitelist", "floor=1", "*"]),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(_fields, _ops), inner, max_size=3),
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def schema_conn() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    for step in MIGRATIONS:
        for statement in step:
            conn.execute(statement)
    try:
        yield conn
    finally:
        conn.close()


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(query=st.dictionaries(st.one_of(_fields, _ops), _json, max_size=3))
def test_any_query_compiles_to_valid_sql_or_is_refused(
    schema_conn: sqlite3.Connection, query: dict[str, Any]
) -> None:
    try:
        where, params = compile_query(query)
    except ValidationError as exc:
        assert "\n" not in str(exc)
        return
    schema_conn.execute(f"SELECT {render(SQLITE).key_columns} FROM access_keys k WHERE {where}",
                        params).fetchall()


@settings(max_examples=300, deadline=None)
@given(query=st.dictionaries(st.one_of(_fields, _ops), _json, max_size=3))
def test_any_query_compiles_to_valid_postgresql_or_is_refused(
    pg_schema: PgSchema, query: dict[str, Any]
) -> None:
    try:
        where, params = compile_query(query, POSTGRES)
    except ValidationError:
        return
    pg_schema.run(f"SELECT {render(POSTGRES_SPELLING).key_columns} FROM access_keys k "
                  f"WHERE {where}", params)


class PgSchema:
    """A PostgreSQL keystore database and one connection to it, on a loop of its own."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(url))

    def run(self, sql: str, params: list[Any]) -> None:
        self.loop.run_until_complete(self.conn.fetch(sql, *params))

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


@pytest.fixture(scope="module")
def pg_schema(postgres: PostgresServer) -> Iterator[PgSchema]:
    name = postgres.new_database()
    schema = PgSchema(postgres.url(name))
    try:
        yield schema
    finally:
        schema.close()
        postgres.drop_database(name)
