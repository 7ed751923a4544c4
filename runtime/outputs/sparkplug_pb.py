"""The Sparkplug B payload (Eclipse Tahu ``sparkplug_b.proto``, proto2, package ``org.eclipse.tahu.protobuf``).

Built at import time from a ``FileDescriptorProto`` instead of protoc output, so it works with any protobuf runtime
(generated ``_pb2`` files are tied to the protoc version). Only the fields rdedge writes are declared; the field
numbers and types are those of the official file, so any Sparkplug host decodes these payloads, and fields we do not
declare (metadata, properties, datasets, templates) survive a parse as unknown fields.

    Payload: timestamp=1 (uint64, ms), metrics=2 (repeated Metric), seq=3 (uint64), uuid=4, body=5
    Metric:  name=1, alias=2, timestamp=3, datatype=4 (uint32, DataType), is_historical=5, is_transient=6, is_null=7,
             int_value=10 (uint32), long_value=11 (uint64), float_value=12, double_value=13, boolean_value=14,
             string_value=15, bytes_value=16 (oneof value)
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# DataType enum of the spec (the values carried in Metric.datatype)
INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64 = 1, 2, 3, 4, 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT = 9, 10, 11, 12, 13, 14

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED


def _build() -> tuple[Any, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(name="rdedge_sparkplug_b.proto", package="org.eclipse.tahu.protobuf",
                                             syntax="proto2")  # fmt: skip
    payload = fdp.message_type.add(name="Payload")
    metric = payload.nested_type.add(name="Metric")
    metric.oneof_decl.add(name="value")
    for name, num, typ in (("name", 1, _F.TYPE_STRING), ("alias", 2, _F.TYPE_UINT64), ("timestamp", 3, _F.TYPE_UINT64),
                           ("datatype", 4, _F.TYPE_UINT32), ("is_historical", 5, _F.TYPE_BOOL),
                           ("is_transient", 6, _F.TYPE_BOOL), ("is_null", 7, _F.TYPE_BOOL)):  # fmt: skip
        metric.field.add(name=name, number=num, type=typ, label=_OPT)
    for name, num, typ in (("int_value", 10, _F.TYPE_UINT32), ("long_value", 11, _F.TYPE_UINT64),
                           ("float_value", 12, _F.TYPE_FLOAT), ("double_value", 13, _F.TYPE_DOUBLE),
                           ("boolean_value", 14, _F.TYPE_BOOL), ("string_value", 15, _F.TYPE_STRING),
                           ("bytes_value", 16, _F.TYPE_BYTES)):  # fmt: skip
        metric.field.add(name=name, number=num, type=typ, label=_OPT, oneof_index=0)
    payload.field.add(name="timestamp", number=1, type=_F.TYPE_UINT64, label=_OPT)
    payload.field.add(name="metrics", number=2, type=_F.TYPE_MESSAGE, label=_REP,
                      type_name=".org.eclipse.tahu.protobuf.Payload.Metric")  # fmt: skip
    payload.field.add(name="seq", number=3, type=_F.TYPE_UINT64, label=_OPT)
    payload.field.add(name="uuid", number=4, type=_F.TYPE_STRING, label=_OPT)
    payload.field.add(name="body", number=5, type=_F.TYPE_BYTES, label=_OPT)
    payload.extension_range.add(start=6, end=536870912)
    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(fdp)
    del fd
    desc = pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload")
    cls = message_factory.GetMessageClass(desc)
    return cls, message_factory.GetMessageClass(desc.nested_types_by_name["Metric"])


Payload, Metric = _build()

_VALUE_FIELD = {INT8: "int_value", INT16: "int_value", INT32: "int_value", UINT8: "int_value", UINT16: "int_value",
                UINT32: "int_value", INT64: "long_value", UINT64: "long_value", DATETIME: "long_value",
                FLOAT: "float_value", DOUBLE: "double_value", BOOLEAN: "boolean_value", STRING: "string_value",
                TEXT: "string_value"}  # fmt: skip


def add_metric(
    payload: Any, name: str, datatype: int, value: Any, *, timestamp_ms: int | None = None, historical: bool = False
) -> None:
    """Append one metric to ``payload`` (``value`` ``None`` writes ``is_null``)."""
    m = payload.metrics.add()
    m.name = name
    m.datatype = datatype
    if timestamp_ms is not None:
        m.timestamp = timestamp_ms
    if historical:
        m.is_historical = True
    if value is None:
        m.is_null = True
    else:
        setattr(m, _VALUE_FIELD[datatype], value)
