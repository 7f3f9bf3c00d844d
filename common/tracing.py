"""Traces an operator's tools can read: one trace per workflow, across every script, with OpenTelemetry.

The W3C trace context travels in each Kafka record's headers (`traceparent`, `tracestate`). The event sources start
a trace per event; the shared loop makes one span per record it handles, named for what happened (`route <the
event's type>`, `act on <the command's type>`; `process <topic>` for a record that cannot be read), parented by the
context in the record's headers, and writes that span's context into the headers of everything the record causes.
A state entry keeps the context of the record that last wrote it, so what a timer sends later (a step timed out)
stays in the workflow's trace; a replayed dead letter carries its original's headers, so it does too.

Off unless OTEL_TRACES_EXPORTER names an exporter (zipkin, otlp or console); then the standard variables configure
it (OTEL_EXPORTER_ZIPKIN_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_BSP_SCHEDULE_DELAY, ...) and
OTEL_SERVICE_NAME defaults to the script's name. Off, every function here returns at its first line, and
OpenTelemetry is not even imported."""

import atexit
import logging
import os
from typing import Any

log = logging.getLogger("common")
EXPORTER = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
ON = EXPORTER not in ("", "none")
Headers = list[tuple[str, bytes]]
_tracer: Any = None


def start(name: str) -> None:
    """Set tracing up for the script `name` (once; nothing when it is off)."""
    global _tracer
    if not ON or _tracer is not None:
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if EXPORTER == "zipkin":
        from opentelemetry.exporter.zipkin.json import ZipkinExporter as Exporter
    elif EXPORTER == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Exporter
    elif EXPORTER == "console":
        Exporter = ConsoleSpanExporter
    else:
        raise SystemExit(f"{name}: OTEL_TRACES_EXPORTER={EXPORTER!r} is not one this project knows: zipkin, otlp, "
                         "console or none")
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or name}))
    provider.add_span_processor(BatchSpanProcessor(Exporter()))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)  # (sends the spans still waiting)
    _tracer = trace.get_tracer("orchestrated-microservices")
    log.info("%s: tracing on, exporting to %s", name, EXPORTER)


def active() -> bool:
    """Whether spans are being made (tracing on and started)."""
    return _tracer is not None


def consumed(record) -> Any:
    """The span of handling one Kafka record, parented by the trace context in its headers (None when off)."""
    if _tracer is None:
        return None
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    return _tracer.start_span(f"process {record.topic}", context=extract(carrier_of(getattr(record, "headers", None))),
                              kind=SpanKind.CONSUMER, attributes={
                                  "messaging.system": "kafka", "messaging.operation.type": "process",
                                  "messaging.destination.name": record.topic,
                                  "messaging.destination.partition.id": str(record.partition),
                                  "messaging.kafka.offset": record.offset})


def produced(topic: str, message) -> Any:
    """The span of an event source sending one message: a new trace, its workflow's (None when off)."""
    if _tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    span = _tracer.start_span(f"send {topic}", kind=SpanKind.PRODUCER, attributes={
        "messaging.system": "kafka", "messaging.operation.type": "send", "messaging.destination.name": topic})
    about(span, message, "send")
    return span


def resumed(context: str | None, name: str) -> Any:
    """A span continuing a trace kept in a state entry (a timer firing), or None (off, or no context kept)."""
    if _tracer is None or not context:
        return None
    from opentelemetry.propagate import extract

    return _tracer.start_span(name, context=extract({"traceparent": context}))


def about(span, message, doing: str | None = None) -> None:
    """Name the message a span handled or sent: its id, type and workflow; and the span for what happened (`doing`
    its message type: "route <type>", "act on <type>"), the topic staying an attribute."""
    if span is not None and message is not None:
        span.set_attributes({"messaging.message.id": message.id, "message.type": message.type,
                             "workflow.id": message.workflow_id})
        if doing:
            span.update_name(f"{doing} {message.type}")


def failed(span, reason: str) -> None:
    """Mark a span as an error: a dead letter, an aborted transaction, a fenced copy."""
    if span is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, reason[:300]))


def ended(span) -> None:
    if span is not None:
        span.end()


def end_batch(handled: list, done: list | None, timer_spans: list, sent: bool, trouble: str) -> None:
    """End the spans of a batch: an error where its transaction did not commit (`done`: the records committed;
    `sent`: whether the timers' messages went out; `trouble`: why not)."""
    if not active():
        return
    committed = {id(item.record) for item in done or ()}
    for item in handled:
        if id(item.record) not in committed:
            failed(item.span, f"not delivered ({trouble}); handled again")
        ended(item.span)
    for span in timer_spans:
        if not sent:
            failed(span, f"not delivered ({trouble}); fires again")
        ended(span)


def headers(span) -> Headers | None:
    """The record headers that carry a span's context to whatever reads its outputs (None when off)."""
    if span is None:
        return None
    from opentelemetry.propagate import inject
    from opentelemetry.trace import set_span_in_context

    carrier: dict[str, str] = {}
    inject(carrier, context=set_span_in_context(span))
    return [(key, value.encode()) for key, value in carrier.items()]


def traceparent(carried: Headers | None) -> str | None:
    """The context in a span's headers as one string, to keep in a state entry (None when off)."""
    for key, value in carried or ():
        if key == "traceparent":
            return value.decode()
    return None


def zipkin_link(record_headers: Headers | None) -> str | None:
    """Where the Zipkin UI shows the trace a record belongs to (tracing to Zipkin on, and the record traced)."""
    return zipkin_trace(carrier_of(record_headers).get("traceparent", ""))


def zipkin_trace(parent: str | None) -> str | None:
    """Where the Zipkin UI shows the trace of a trace context (a traceparent), with tracing to Zipkin on."""
    if EXPORTER != "zipkin" or (parent or "").count("-") != 3:
        return None
    endpoint = os.environ.get("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "http://localhost:9411/api/v2/spans")
    return f"{endpoint.removesuffix('/api/v2/spans')}/zipkin/traces/{parent.split('-')[1]}"


TRACE_HEADERS = ("traceparent", "tracestate")


def kept(record_headers: Headers | None) -> Headers | None:
    """A record's trace headers, to send along with what stands for it (its dead letter, its replay)."""
    return [(key, value) for key, value in record_headers or () if key in TRACE_HEADERS] or None


def carrier_of(record_headers: Headers | None) -> dict[str, str]:
    """The trace context in a record's headers (others, and what is not text, are left out)."""
    carrier = {}
    for key, value in record_headers or ():
        if key in TRACE_HEADERS and value is not None:
            try:
                carrier[key] = value.decode()
            except UnicodeDecodeError:
                pass
    return carrier
