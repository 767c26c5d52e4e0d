"""The NATS fixtures of the stream tests, for every test of events that needs the stream."""

from tests.events.test_stream import names, nats_url

__all__ = ["names", "nats_url"]
