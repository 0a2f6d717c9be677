"""MQTT 3.1.1 packets as bytes (broker.mqtt.codec): each encoder against the bytes the
spec gives, each decoder on good packets and on every malformed case it must refuse."""

from __future__ import annotations

import struct

import pytest

from broker.mqtt import codec, props
from broker.mqtt.codec import MalformedPacket, Publish


def u16(value: int) -> bytes:
    return struct.pack("!H", value)


def string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return u16(len(data)) + data


# ------------------------------------------------------------------ encoders

@pytest.mark.parametrize(("size", "encoded"), [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"), (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"),
    (268_435_455, b"\xff\xff\xff\x7f"),
])
def test_remaining_length_is_the_variable_byte_integer_of_the_spec(size: int,
                                                                    encoded: bytes) -> None:
    """MQTT 3.1.1 §2.2.3, table 2.4: the boundaries of one to four bytes."""
    assert codec.remaining_length(size) == encoded


def test_a_qos0_publish_has_no_packet_id() -> None:
    packet = codec.publish_packet(b"a/b", b"hi", 0, False, packet_id=7)
    assert packet == b"\x30" + bytes([2 + 3 + 2]) + string("a/b") + b"hi"


def test_a_qos1_publish_carries_its_packet_id_and_its_flags() -> None:
    packet = codec.publish_packet(b"t", b"x" * 200, 1, True, packet_id=513, dup=True)
    # 0x30 | DUP 0x08 | QoS 1 << 1 | RETAIN 0x01; 2+1+2+200 = 205 needs two length bytes.
    assert packet[0] == 0x3B
    assert packet[1:3] == b"\xcd\x01"
    assert packet[3:] == string("t") + u16(513) + b"x" * 200


def test_a_qos2_publish_sets_qos_2_and_nothing_else() -> None:
    packet = codec.publish_packet(b"t", b"", 2, False, packet_id=1)
    assert packet == b"\x34\x05" + string("t") + u16(1)


@pytest.mark.parametrize(("kind", "first"), [
    (codec.PUBACK, 0x40), (codec.PUBREC, 0x50), (codec.PUBREL, 0x62), (codec.PUBCOMP, 0x70),
    (codec.UNSUBACK, 0xB0),
])
def test_acknowledgements_carry_the_flags_their_type_requires(kind: int, first: int) -> None:
    """PUBREL alone has flags 0b0010 (MQTT-3.6.1-1)."""
    assert codec.ack_packet(kind, 0x1234) == bytes([first, 2, 0x12, 0x34])


def test_a_suback_has_one_code_per_filter_in_order() -> None:
    assert codec.suback_packet(9, [0, 1, codec.SUBACK_FAILURE, 2]) == \
        b"\x90\x06" + u16(9) + bytes([0, 1, 0x80, 2])


def test_connack_session_present_only_when_accepted() -> None:
    """MQTT-3.2.2-4: a refused CONNECT has session present 0 whatever the session."""
    assert codec.connack_packet(True, 0) == b"\x20\x02\x01\x00"
    assert codec.connack_packet(False, 0) == b"\x20\x02\x00\x00"
    assert codec.connack_packet(True, 5) == b"\x20\x02\x00\x05"


def test_pingresp_is_the_two_byte_packet() -> None:
    assert codec.PINGRESP_PACKET == bytes([codec.PINGRESP << 4, 0])


# ------------------------------------------------------------------ PUBLISH

@pytest.mark.parametrize(("qos", "retain", "dup", "packet_id"), [
    (0, False, False, 0), (0, True, False, 0), (1, False, True, 1), (2, True, True, 65535),
])
def test_parse_publish_reads_back_what_publish_packet_writes(qos: int, retain: bool, dup: bool,
                                                             packet_id: int) -> None:
    packet = codec.publish_packet("ünï/çode".encode(), b"\x00payload\xff", qos, retain,
                                  packet_id, dup)
    body = packet[1 + len(codec.remaining_length(len(packet) - 2)):]
    assert codec.parse_publish(packet[0], body) == Publish(
        "ünï/çode", b"\x00payload\xff", qos, retain, dup, packet_id)


def test_a_publish_may_have_an_empty_payload() -> None:
    assert codec.parse_publish(0x31, string("t")) == Publish("t", b"", 0, True, False, 0)


@pytest.mark.parametrize(("first", "body", "problem"), [
    (0x36, string("t") + u16(1), "QoS 3"),
    (0x38, string("t"), "DUP set on a QoS 0"),
    (0x30, b"\x00", "string length beyond the packet"),
    (0x30, u16(5) + b"abc", "string beyond the packet"),
    (0x32, string("t"), "without packet id"),
    (0x32, string("t") + b"\x01", "without packet id"),
    (0x34, string("t") + u16(0) + b"x", "packet id 0"),
])
def test_a_malformed_publish_is_refused(first: int, body: bytes, problem: str) -> None:
    with pytest.raises(MalformedPacket, match=problem):
        codec.parse_publish(first, body)


# ------------------------------------------------------------------ SUBSCRIBE, UNSUBSCRIBE

def test_parse_subscribe_reads_every_filter_with_its_qos() -> None:
    body = u16(10) + string("a/#") + b"\x01" + string("b/+") + b"\x02" + string("c") + b"\x00"
    assert codec.parse_subscribe(body) == (10, [("a/#", 1), ("b/+", 2), ("c", 0)])


@pytest.mark.parametrize(("body", "problem"), [
    (u16(1), "without a topic filter"),
    (u16(1) + string("a"), "filter without QoS"),
    (u16(0) + string("a") + b"\x00", "packet id 0"),
    (b"\x01", "2-byte packet id"),
    (u16(1) + u16(9) + b"a", "string beyond the packet"),
])
def test_a_malformed_subscribe_is_refused(body: bytes, problem: str) -> None:
    with pytest.raises(MalformedPacket, match=problem):
        codec.parse_subscribe(body)


def test_parse_unsubscribe_reads_every_filter() -> None:
    assert codec.parse_unsubscribe(u16(3) + string("a/#") + string("b")) == (3, ["a/#", "b"])


@pytest.mark.parametrize(("body", "problem"), [
    (u16(3), "without a topic filter"),
    (u16(0) + string("a"), "packet id 0"),
    (u16(3) + b"\x00", "string length beyond the packet"),
])
def test_a_malformed_unsubscribe_is_refused(body: bytes, problem: str) -> None:
    with pytest.raises(MalformedPacket, match=problem):
        codec.parse_unsubscribe(body)


# ------------------------------------------------------------------ packet ids

def test_packet_id_of_reads_two_bytes_big_endian() -> None:
    assert codec.packet_id_of(b"\x01\x02") == 258


@pytest.mark.parametrize(("body", "problem"), [
    (b"", "got 0 bytes"), (b"\x01", "got 1 bytes"), (b"\x00\x01\x02", "got 3 bytes"),
    (b"\x00\x00", "packet id 0"),
])
def test_a_bad_packet_id_is_refused(body: bytes, problem: str) -> None:
    """An acknowledgement's body is exactly a non-zero packet id (MQTT-2.3.1-1)."""
    with pytest.raises(MalformedPacket, match=problem):
        codec.packet_id_of(body)



# ------------------------------------------------------------------ CONNECT (3.1.1 and 5.0)

def connect_body(level: int, flags: int, *fields: bytes, props: bytes = b"",
                 keep_alive: int = 30, protocol: str = "MQTT") -> bytes:
    return string(protocol) + bytes([level, flags]) + u16(keep_alive) + props + b"".join(fields)


def test_a_311_connect_with_will_and_credentials() -> None:
    # clean session, Will QoS 1 retained, user name, password
    body = connect_body(4, 0x02 | 0x04 | 0x08 | 0x20 | 0x80 | 0x40, string("dev"),
                        string("will/t"), u16(2) + b"\xff\x00", string("key"),
                        u16(3) + b"\x00\xfe\xff", keep_alive=60)
    assert codec.parse_connect(body) == codec.Connect(
        "MQTT", 4, True, 60, {}, "dev", codec.WillSpec("will/t", b"\xff\x00", 1, True, {}),
        "key", b"\x00\xfe\xff")


def test_an_mqtt5_connect_reads_its_properties_and_its_wills() -> None:
    connect_props = props.encode([(props.SESSION_EXPIRY, 3600), (props.RECEIVE_MAXIMUM, 10)])
    will_props = props.encode([(props.WILL_DELAY, 5), (props.CONTENT_TYPE, "text/plain")])
    body = connect_body(5, 0x04 | 0x80, will_props + string("w"), string("gone"),
                        string("key"), props=connect_props + string("dev"))
    connect = codec.parse_connect(body)
    assert (connect.level, connect.clean_start, connect.client_id) == (5, False, "dev")
    assert connect.props == {props.SESSION_EXPIRY: 3600, props.RECEIVE_MAXIMUM: 10}
    assert connect.will == codec.WillSpec(
        "w", b"gone", 0, False, {props.WILL_DELAY: 5, props.CONTENT_TYPE: "text/plain"})
    assert (connect.username, connect.password) == ("key", None)  # MQTT 5 allows this


@pytest.mark.parametrize(("protocol", "level"), [("MQTT", 3), ("MQTT", 6), ("MQIsdp", 3)])
def test_another_protocol_or_level_is_returned_for_the_caller_to_refuse(protocol: str,
                                                                         level: int) -> None:
    connect = codec.parse_connect(connect_body(level, 0x02, string("x"), protocol=protocol))
    assert (connect.protocol, connect.level, connect.client_id) == (protocol, level, "")


@pytest.mark.parametrize(("body", "problem"), [
    (string("MQTT") + b"\x04\x02", "truncated CONNECT"),
    (connect_body(4, 0x03, string("d")), "reserved CONNECT flag"),
    (connect_body(4, 0x08, string("d")), "Will QoS or retain without a Will"),
    (connect_body(4, 0x20, string("d")), "Will QoS or retain without a Will"),
    (connect_body(4, 0x1C, string("d"), string("w"), string("m")), "Will QoS 3"),
    (connect_body(4, 0x42, string("d"), string("secret")), "password without user name"),
    (connect_body(4, 0x02, string("d"), b"\x00"), "bytes after the CONNECT payload"),
    (connect_body(4, 0x02, string(b"\xff")), "invalid UTF-8"),
    (connect_body(4, 0x06, string("d"), string(b"\xc3"), string("m")), "invalid UTF-8"),
    (connect_body(4, 0x82, string("d"), string(b"a\x00")), "NUL"),
    (connect_body(4, 0x02, u16(5) + b"ab"), "data beyond the packet"),
    (connect_body(5, 0x02, string("d"), props=props.encode([(props.TOPIC_ALIAS, 1)])),
     "property 0x23 not allowed here"),
    (connect_body(5, 0x02, string("d"), props=b"\x05\x11\x00"), "beyond"),
])
def test_a_malformed_connect_is_refused(body: bytes, problem: str) -> None:
    with pytest.raises(MalformedPacket, match=problem):
        codec.parse_connect(body)


# ------------------------------------------------------------------ MQTT 5 encoders

def test_an_mqtt5_connack_has_its_reason_and_properties() -> None:
    listed = props.encode([(props.RECEIVE_MAXIMUM, 20)])
    assert codec.connack5(True, 0, listed) == b"\x20\x06\x01\x00" + listed
    assert codec.connack5(True, props.NOT_AUTHORIZED) == b"\x20\x03\x00\x87\x00"


def test_an_mqtt5_publish_carries_its_properties_between_header_and_payload() -> None:
    listed = props.encode([(props.MESSAGE_EXPIRY, 60)])
    packet = codec.publish5(b"t", b"pay", 1, False, 9, props=listed)
    assert packet == b"\x32" + bytes([3 + 2 + len(listed) + 3]) + string("t") + u16(9) + \
        listed + b"pay"
    assert codec.publish5(b"t", b"", 0, True) == b"\x31\x04" + string("t") + b"\x00"


def test_an_mqtt5_acknowledgement_leaves_out_success_and_no_properties() -> None:
    """§3.4.2.1: reason code and property length may be left out when Success, none."""
    assert codec.ack5(codec.PUBACK, 7) == b"\x40\x02" + u16(7)
    assert codec.ack5(codec.PUBREL, 7) == b"\x62\x02" + u16(7)
    assert codec.ack5(codec.PUBACK, 7, props.NOT_AUTHORIZED) == b"\x40\x04" + u16(7) + \
        b"\x87\x00"
    reason = props.encode([(props.REASON_STRING, "no")])
    assert codec.ack5(codec.PUBREC, 7, props.QUOTA_EXCEEDED, reason) == \
        b"\x50" + bytes([3 + len(reason)]) + u16(7) + b"\x97" + reason


def test_mqtt5_suback_and_unsuback_put_properties_before_the_codes() -> None:
    assert codec.suback5(3, [1, props.NOT_AUTHORIZED]) == b"\x90\x05" + u16(3) + b"\x00\x01\x87"
    assert codec.unsuback5(3, [0, props.NO_SUBSCRIPTION_EXISTED]) == \
        b"\xb0\x05" + u16(3) + b"\x00\x00\x11"


def test_an_mqtt5_disconnect_is_empty_for_a_normal_end() -> None:
    assert codec.disconnect5(0) == b"\xe0\x00"
    assert codec.disconnect5(props.SESSION_TAKEN_OVER) == b"\xe0\x02\x8e\x00"
    reason = props.encode([(props.REASON_STRING, "key inactive")])
    assert codec.disconnect5(props.ADMINISTRATIVE_ACTION, reason) == \
        b"\xe0" + bytes([1 + len(reason)]) + b"\x98" + reason


# ------------------------------------------------------------------ MQTT 5 decoders

def test_parse_publish5_reads_back_what_publish5_writes() -> None:
    listed = props.encode([(props.CONTENT_TYPE, "json"), (props.USER_PROPERTY, ("a", "b")),
                           (props.USER_PROPERTY, ("a", "c"))])
    packet = codec.publish5(b"t/1", b"{}", 2, True, 4, dup=True, props=listed)
    publish, found = codec.parse_publish5(packet[0], packet[2:])
    assert publish == Publish("t/1", b"{}", 2, True, True, 4)
    assert found == {props.CONTENT_TYPE: "json",
                     props.USER_PROPERTY: [("a", "b"), ("a", "c")]}


def test_an_mqtt5_publish_may_name_its_topic_by_alias_only() -> None:
    listed = props.encode([(props.TOPIC_ALIAS, 3)])
    publish, found = codec.parse_publish5(0x30, string("") + listed + b"x")
    assert (publish.topic, publish.payload, found) == ("", b"x", {props.TOPIC_ALIAS: 3})


@pytest.mark.parametrize(("first", "body", "problem"), [
    (0x36, string("t") + u16(1) + b"\x00", "QoS 3"),
    (0x38, string("t") + b"\x00", "DUP set on a QoS 0"),
    (0x32, string("t"), "without packet id"),
    (0x32, string("t") + u16(0) + b"\x00", "packet id 0"),
    (0x30, string("t") + props.encode([(props.SESSION_EXPIRY, 1)]), "not allowed here"),
    (0x30, string("t") + props.encode([(props.CONTENT_TYPE, "a"), (props.CONTENT_TYPE, "b")]),
     "twice"),
    (0x30, string("t") + b"\x09\x01", "properties beyond the packet"),
])
def test_a_malformed_mqtt5_publish_is_refused(first: int, body: bytes, problem: str) -> None:
    with pytest.raises(MalformedPacket, match=problem):
        codec.parse_publish5(first, body)


def test_parse_ack5_reads_the_id_and_the_reason_success_when_left_out() -> None:
    assert codec.parse_ack5(u16(5)) == (5, 0)
    assert codec.parse_ack5(u16(5) + b"\x10") == (5, 0x10)
    reason = props.encode([(props.REASON_STRING, "why")])
    assert codec.parse_ack5(u16(5) + b"\x80" + reason) == (5, 0x80)


@pytest.mark.parametrize(("body", "problem"), [
    (b"\x01", "without packet id"),
    (u16(0), "packet id 0"),
    (u16(1) + b"\x00" + props.encode([(props.REASON_STRING, "x")]) + b"!", "bytes after"),
    (u16(1) + b"\x00" + props.encode([(props.TOPIC_ALIAS, 1)]), "not allowed here"),
])
def test_a_malformed_mqtt5_acknowledgement_is_refused(body: bytes, problem: str) -> None:
    with pytest.raises(MalformedPacket, match=problem):
        codec.parse_ack5(body)


def test_parse_subscribe5_reads_each_filters_options_and_the_identifier() -> None:
    listed = props.encode([(props.SUBSCRIPTION_ID, [300])])
    body = u16(2) + listed + string("a/#") + bytes([0b101110]) + string("b") + b"\x00"
    assert codec.parse_subscribe5(body) == (2, 300, [
        codec.Subscription("a/#", 2, True, True, 2),
        codec.Subscription("b", 0, False, False, 0)])
    assert codec.parse_subscribe5(u16(2) + b"\x00" + string("c") + b"\x01")[1] == 0


@pytest.mark.parametrize(("body", "problem"), [
    (u16(1) + b"\x00", "without a topic filter"),
    (u16(1) + b"\x00" + string("a"), "filter without options"),
    (u16(1) + b"\x00" + string("a") + b"\x03", "invalid subscription options"),  # QoS 3
    (u16(1) + b"\x00" + string("a") + b"\x30", "invalid subscription options"),  # handling 3
    (u16(1) + b"\x00" + string("a") + b"\x40", "invalid subscription options"),  # reserved
    (u16(1) + props.encode([(props.SUBSCRIPTION_ID, [0])]) + string("a") + b"\x00",
     "subscription identifier 0"),
    (u16(1) + props.encode([(props.SUBSCRIPTION_ID, [1]), (props.SUBSCRIPTION_ID, [2])])
     + string("a") + b"\x00", "more than one"),
    (u16(0) + b"\x00" + string("a") + b"\x00", "packet id 0"),
])
def test_a_malformed_mqtt5_subscribe_is_refused(body: bytes, problem: str) -> None:
    with pytest.raises(MalformedPacket, match=problem):
        codec.parse_subscribe5(body)


def test_parse_unsubscribe5_skips_its_properties() -> None:
    listed = props.encode([(props.USER_PROPERTY, ("k", "v"))])
    assert codec.parse_unsubscribe5(u16(4) + listed + string("a") + string("b/#")) == (
        4, ["a", "b/#"])
    with pytest.raises(MalformedPacket, match="without a topic filter"):
        codec.parse_unsubscribe5(u16(4) + b"\x00")


def test_parse_disconnect5_reads_what_was_sent_of_reason_and_properties() -> None:
    assert codec.parse_disconnect5(b"") == (0, {})
    assert codec.parse_disconnect5(b"\x04") == (props.DISCONNECT_WITH_WILL, {})
    listed = props.encode([(props.SESSION_EXPIRY, 0)])
    assert codec.parse_disconnect5(b"\x00" + listed) == (0, {props.SESSION_EXPIRY: 0})
    with pytest.raises(MalformedPacket, match="bytes after the properties"):
        codec.parse_disconnect5(b"\x00" + listed + b"\x00")


@pytest.mark.parametrize(("first", "body", "problem"), [
    (0x30, string("a/+"), "invalid_topic"),
    (0x30, string("#"), "invalid_topic"),
    (0x30, string(""), "invalid_topic"),
    (0x30, string("a\x00b"), "NUL"),
    (0x30, string(b"a\xff"), "bad string"),
    (0x30, string(b"\xed\xa0\x80"), "bad string"),
    (0x30, u16(10) + b"abc", "string beyond the packet"),
    (0x32, string("a/b"), "without packet id"),
    (0x36, string("a") + u16(1), "QoS 3"),
], ids=["plus", "hash", "empty", "nul", "bad-utf8", "surrogate", "short", "no-id", "qos3"])
def test_a_publish_topic_is_checked_where_it_is_decoded(first: int, body: bytes,
                                                        problem: str) -> None:
    """A connected 3.1.1 client's PUBLISH reaches the parser unchecked by the framer
    (Framer.publish_parsed): the parser refuses what the framer would have."""
    with pytest.raises(MalformedPacket, match=problem):
        codec.parse_publish(first, body)
