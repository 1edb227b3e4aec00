"""The HTTP server's plumbing. ``EventBridge``: a request's events reach the event loop in order, text joined
between handovers, the first piece and every end at once (a manual clock; the loop runs only to deliver). And
idle connections: the server keeps them longer than clients do."""

from __future__ import annotations

import asyncio
import math

from hf_kvcache_plugin.app.event_bridge import EventBridge


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drain(loop: asyncio.AbstractEventLoop, bridge: EventBridge) -> list:
    loop.run_until_complete(asyncio.sleep(0))  # runs the handovers scheduled so far
    out = []
    while not bridge.queue.empty():
        out.append(bridge.queue.get_nowait())
    return out


def test_text_is_handed_over_at_most_once_per_interval_and_ends_at_once():
    loop, clock = asyncio.new_event_loop(), Clock()
    try:
        handovers = []
        schedule = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (handovers.append(a), schedule(*a))[1]
        bridge = EventBridge(loop, flush_s=0.02, clock=clock)
        bridge.put("text", 0, "Once")  # the first piece: at once
        assert drain(loop, bridge) == [("text", 0, "Once")]
        for i, piece in enumerate([" upon", " a", " time"]):
            clock.now = 0.005 * (i + 1)
            bridge.put("text", 0, piece)
        assert drain(loop, bridge) == []  # within the interval: held
        bridge.put("text", 1, "The")  # another row's text does not join row 0's
        clock.now = 0.021
        bridge.put("text", 0, ",")
        assert drain(loop, bridge) == [("text", 0, " upon a time"), ("text", 1, "The"), ("text", 0, ",")]
        clock.now = 0.022
        bridge.put("text", 0, " there")
        bridge.put("end", 0, "length")  # an end goes at once, after the text before it
        assert drain(loop, bridge) == [("text", 0, " there"), ("end", 0, "length")]
        assert len(handovers) == 3
    finally:
        loop.close()


def test_a_non_streamed_answer_is_handed_over_with_its_end_only():
    loop = asyncio.new_event_loop()
    try:
        bridge = EventBridge(loop, flush_s=math.inf, clock=Clock())
        for piece in ["a", "b", "c"]:
            bridge.put("text", 0, piece)
        assert drain(loop, bridge) == []
        bridge.put("error", -1, RuntimeError("boom"))
        [text, (event, row, exc)] = drain(loop, bridge)
        assert text == ("text", 0, "abc") and (event, row, str(exc)) == ("error", -1, "boom")
    finally:
        loop.close()


def test_a_closed_loop_drops_events_quietly():
    loop = asyncio.new_event_loop()
    bridge = EventBridge(loop, flush_s=0.0, clock=Clock())
    loop.close()
    bridge.put("end", 0, "stop")  # the client went away and the loop with it: nothing raises


def test_the_server_keeps_idle_connections_longer_than_clients_do():
    import httpx
    import openai

    from hf_kvcache_plugin.app.http_serve import ApiServer

    server = ApiServer(app=None)
    # the client closes an idle pooled connection first: no request is sent onto one the server is closing
    for client_expiry in (httpx.Limits().keepalive_expiry, openai.DEFAULT_CONNECTION_LIMITS.keepalive_expiry):
        assert server.config.timeout_keep_alive > client_expiry
