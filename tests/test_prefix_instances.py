"""Two lcha instances with the prefix policy agree on where conversations go."""

import json

CONVERSATIONS = 8


def first_turn(index):
    return {
        "messages": [
            # A system prompt of its own: with a shared one, every new
            # conversation rightly goes where that prompt is cached.
            {"role": "system", "content": f"You are assistant number {index}. " * 10},
            {"role": "user", "content": f"Conversation {index}: tell me about topic {index}."},
        ],
        "max_tokens": 4,
    }


async def backend_for(http, server, body):
    async with http.post(server.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
        await response.read()
        return response.headers["X-Lcha-Backend"]


async def test_two_instances_route_alike(fakes, lcha, http):
    backends = await fakes(4, slots=2)
    first = await lcha(backends, routing={"policy": "prefix"})
    second = await lcha(backends, routing={"policy": "prefix"})
    chosen = set()
    for index in range(CONVERSATIONS):
        body = first_turn(index)
        via_first = await backend_for(http, first, body)
        via_second = await backend_for(http, second, json.loads(json.dumps(body)))
        assert via_first == via_second, f"conversation {index}"
        chosen.add(via_first)
    # Rendezvous hashing spreads new conversations instead of piling them up.
    assert len(chosen) > 1


async def test_second_turn_follows_first(fakes, lcha, http):
    backends = await fakes(4, slots=2)
    first = await lcha(backends, routing={"policy": "prefix"})
    second = await lcha(backends, routing={"policy": "prefix"})
    for index in range(CONVERSATIONS):
        body = first_turn(index)
        served_by = await backend_for(http, first, body)
        # The next turn arrives at the other instance, which never saw the
        # conversation, and still finds the backend that has its prefix cached.
        follow_up = {
            "messages": body["messages"]
            + [
                {"role": "assistant", "content": "Sure."},
                {"role": "user", "content": "Go on."},
            ],
            "max_tokens": 4,
        }
        assert await backend_for(http, second, follow_up) == served_by, f"conversation {index}"
