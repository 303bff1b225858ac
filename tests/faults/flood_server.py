"""A WebSocket server for fault tests: numbered events, garbage frames and dropped connections.

Run as a script: prints its port, then serves. Each event carries `id`; ids
continue across reconnects, so a test can check every id arrived exactly once.
Drops are clean closes after a frame boundary (what TCP guarantees was sent
was received), so nothing the server sent is lost in flight.
"""

from __future__ import annotations

import asyncio
import random
import sys

import orjson
import websockets


async def main(total: int, drop_every: int, garbage_every: int, seed: int) -> None:
    rng = random.Random(seed)
    state = {"next": 0, "conn": 0}

    async def handler(ws: websockets.ServerConnection) -> None:
        try:
            await serve(ws)
        except websockets.ConnectionClosed:  # the client went away (a drop it makes, or its stop)
            pass

    async def serve(ws: websockets.ServerConnection) -> None:
        state["conn"] += 1
        await ws.send(orjson.dumps({"connection_id": f"conn-{state['conn']}"}).decode())
        budget = rng.randint(1, drop_every) if drop_every else total
        while state["next"] < total and budget > 0:
            i = state["next"]
            state["next"] += 1
            budget -= 1
            await ws.send(orjson.dumps({"channel": "transcript", "id": i, "rtstream_id": "rts-1",
                                        "data": {"text": f"event {i}", "is_final": True, "start": i}}).decode())
            if garbage_every and i % garbage_every == 0:
                await ws.send(rng.choice(["garbage{", "[1, 2]", "42", '"str"']))
            if i % 256 == 0:  # let the connection read what the client sent (its close), as a real server does
                await asyncio.sleep(0)
        if state["next"] >= total:
            await asyncio.Future()  # done: keep the connection open until the client stops
        await ws.close()

    server = await websockets.serve(handler, "127.0.0.1", 0, max_size=None)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    total, drop_every, garbage_every, seed = (int(x) for x in sys.argv[1:5])
    asyncio.run(main(total, drop_every, garbage_every, seed))
