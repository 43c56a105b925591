"""The leader's control channel: hellos with the instance's token, acks that resolve requests, and a
follower that goes away noticed at once (its pending requests fail, ``on_lost`` names it)."""

from __future__ import annotations

import threading

import pytest

from pdmesh.parallel.control import ControlError, ControlHub, ControlLink

pytestmark = pytest.mark.timeout(30)


def hub_and_links(ranks: list[int], token: str = "t0k"):
    hub = ControlHub("127.0.0.1", token, ranks)
    links: dict[int, ControlLink] = {}
    accepted = threading.Thread(target=hub.accept_all, args=(10.0,))
    accepted.start()
    for rank in ranks:
        links[rank] = ControlLink(
            ("127.0.0.1", hub.port), {"rank": rank, "token": token, "endpoint": "e"}, 5.0
        )
    accepted.join(10)
    assert set(hub.hellos) == set(ranks)
    return hub, links


def test_a_request_is_answered_by_the_followers_ack() -> None:
    hub, links = hub_and_links([1, 2])
    try:
        future = hub.request(2, {"op": "expose", "handle_id": "h", "block_ids": [3]})
        message = links[2].recv()
        assert message["op"] == "expose" and message["block_ids"] == [3]
        links[2].ack(message["id"], "no such block")
        assert future.result(5) == {"op": "ack", "id": message["id"], "ok": False, "error": "no such block"}
    finally:
        hub.close()


def test_a_follower_that_goes_away_is_noticed_at_once() -> None:
    hub, links = hub_and_links([1])
    lost = threading.Event()
    hub.on_lost = lambda rank, why: lost.set() if rank == 1 and "rank 1" in why else None
    try:
        pending = hub.request(1, {"op": "pull"})
        links[1].close()
        assert lost.wait(5)
        with pytest.raises(ControlError, match="follower rank 1 is gone"):
            pending.result(5)
    finally:
        hub.close()


def test_a_hello_without_the_token_is_refused() -> None:
    hub = ControlHub("127.0.0.1", "right", [1])
    try:
        stranger = ControlLink(("127.0.0.1", hub.port), {"rank": 1, "token": "wrong"}, 5.0)
        with pytest.raises(ControlError, match="did not connect within"):
            hub.accept_all(0.5)
        stranger.close()
    finally:
        hub.close()
