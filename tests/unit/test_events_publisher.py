"""The publisher without a cluster: stamping, and an undeliverable event is failed and counted, never lost."""

from __future__ import annotations

import pytest

from pom_ha.events.config import GUIDE_DEFAULTS, map_producer_config
from pom_ha.events.models import JobEvent, ProducerRef
from pom_ha.events.publisher import EventPublisher, EventPublishError

NOWHERE = "127.0.0.1:1"  # nothing listens on port 1


def publisher() -> EventPublisher:
    return EventPublisher(NOWHERE, map_producer_config(GUIDE_DEFAULTS), service="campaign_director", server="pom3",
                          instance="i1", epoch=lambda: 12, extra={"log_level": 0})


def test_stamp_fills_the_producer_with_the_default_or_the_given_epoch() -> None:
    p = publisher()
    e = JobEvent(job_id=1, state="Queued")
    assert p.stamp(e).producer == ProducerRef(service="campaign_director", server="pom3", instance="i1", epoch=12)
    assert p.stamp(e, epoch=4).producer == ProducerRef(service="campaign_director", server="pom3", instance="i1",
                                                       epoch=4)
    already = e.model_copy(update={"producer": ProducerRef(service="x", server="y", epoch=1)})
    assert p.stamp(already) is already


async def test_publish_before_start_is_refused() -> None:
    with pytest.raises(EventPublishError, match="not running"):
        await publisher().publish(JobEvent(job_id=1, state="Queued"))


async def test_an_event_still_undelivered_at_stop_is_failed_and_counted() -> None:
    p = await publisher().start()
    fut = await p.publish(JobEvent(job_id=1, state="Queued"))
    assert p.counts.queued == 1 and p.counts.pending == 1
    assert await p.stop(timeout_s=0.2) == 1
    with pytest.raises(EventPublishError) as info:
        await fut
    assert info.value.retriable
    assert (p.counts.acked, p.counts.failed, p.counts.pending) == (0, 1, 0)
    with pytest.raises(EventPublishError, match="not running"):
        await p.publish(JobEvent(job_id=1, state="Queued"))


async def test_a_full_local_queue_fails_at_once_when_the_caller_cannot_wait() -> None:
    p = await EventPublisher(NOWHERE, map_producer_config(GUIDE_DEFAULTS), service="cm", server="pom1",
                             extra={"log_level": 0, "queue.buffering.max.messages": 1}).start()
    try:
        await p.publish(JobEvent(job_id=1, state="Queued"))
        with pytest.raises(EventPublishError, match="queue full") as info:
            await p.publish(JobEvent(job_id=1, state="Running"), wait_for_room=False)
        assert info.value.retriable and p.counts.queued == 1
    finally:
        await p.stop(timeout_s=0.1)
