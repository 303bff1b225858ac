"""Low-latency Kafka client settings for faust workers: the consumer's fetch wait, which faust fixes at 1.5 s.

Why: a fetch asks the broker to hold the request until records arrive or
`fetch_max_wait_ms` passes. Apache Kafka answers as soon as a record is there,
so the wait costs nothing; other Kafka-API brokers (tansu, the test broker)
poll their storage and answer a fetch only after (part of) that wait even when
records are ready, so faust's fixed 1,500 ms put 0.5-1.5 s between publish and
processing. `runtime.fetch_max_wait` (default 10 ms) bounds that; the price is
one empty fetch per wait while a partition is idle.

faust is imported inside the function so `import pipeline.cli` stays fast.
"""

from __future__ import annotations

from typing import Any


def transport_class(fetch_max_wait: float) -> type[Any]:
    """faust's aiokafka transport, with worker consumers created with `fetch_max_wait` (seconds)."""
    from faust.transport.drivers import aiokafka as driver

    wait_ms = max(1, round(fetch_max_wait * 1000))

    class ConsumerThread(driver.AIOKafkaConsumerThread):  # type: ignore[misc]
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            # faust passes a fixed fetch_max_wait_ms=1500; aiokafka reads this attribute when the
            # consumer starts and builds its fetcher (tests check the fetcher got our value)
            consumer._fetch_max_wait_ms = wait_ms
            return consumer

    class Consumer(driver.Consumer):  # type: ignore[misc]
        def _new_consumer_thread(self) -> Any:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class Transport(driver.Transport):  # type: ignore[misc]
        pass

    Transport.Consumer = Consumer
    return Transport
