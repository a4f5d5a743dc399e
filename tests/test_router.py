"""Router: sticky sessions, prefix affinity, least-load balancing, health and fail-over (fake engine clients)."""

import asyncio

import pytest

from rollout.router import NoHealthyEngineError, Router, page_hashes
from rollout.testing import FakeEngineClient

PARAMS = {"max_new_tokens": 4}


def make_router(n=3, token_delay=0.0, **kwargs):
    clients = [FakeEngineClient(f"e{i}", token_delay=token_delay) for i in range(n)]
    return Router(clients, page_size=4, **kwargs), clients


def test_page_hashes_identify_page_aligned_prefixes():
    a = page_hashes(list(range(10)), 4)
    b = page_hashes(list(range(8)) + [99, 98, 97], 4)
    c = page_hashes([0, 1, 2, 3, 9, 5, 6, 7], 4)
    assert len(a) == 2 and a == b[:2]  # partial last page ignored; same 8 tokens, same hashes
    assert c[0] == a[0] and c[1] != a[1]  # the chain: a change in page 2 changes its hash only


async def test_least_outstanding_round_robin_when_nothing_is_cached():
    router, clients = make_router(3)
    for k in range(6):
        await router.generate([100 + k], PARAMS)  # prompts shorter than a page: no affinity
    assert [len(c.calls) for c in clients] == [2, 2, 2]


async def test_sticky_sessions_keep_an_episode_on_one_engine():
    router, clients = make_router(3)
    for turn in range(4):
        for episode in ("a", "b", "c"):
            await router.generate([turn, 7, 7, 7, 7, 7][:1 + turn], PARAMS, session_id=episode)
    by_episode = {}
    for i, c in enumerate(clients):
        for call in c.calls:
            by_episode.setdefault(call["session_id"], set()).add(i)
    assert all(len(engines) == 1 for engines in by_episode.values())
    assert len(set.union(*by_episode.values())) == 3  # the episodes were spread


async def test_longest_prefix_affinity():
    router, clients = make_router(3)
    sys_a, sys_b = [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9, 8, 8, 8, 8]
    await router.generate(sys_a + [50], PARAMS)  # -> e0
    await router.generate(sys_b + [51], PARAMS)  # -> e1 (least loaded after e0)
    await router.generate(sys_a[:4] + [0, 0, 0, 0, 52], PARAMS)  # shares one page with sys_a -> e0
    assert router.choose(sys_b + [60, 61, 62, 63]) == 1
    assert router.choose(sys_a + [70]) == 0
    await router.generate(sys_a + [71], PARAMS)
    assert [len(c.calls) for c in clients] == [3, 1, 0]
    assert clients[0].calls[-1]["input_ids"] == sys_a + [71]
    stats = router.take_stats()
    assert stats[0].cached_tokens == 4 + 8  # the fake's prefix cache saw the shared pages
    assert router.take_stats()[0].requests == 0  # reset


async def test_affinity_yields_to_load_beyond_threshold():
    router, clients = make_router(2, balance_threshold=1)
    prompt = [1, 2, 3, 4, 5]
    await router.generate(prompt, PARAMS)
    assert router.choose(prompt) == 0
    router.outstanding[0] = 2  # e0 busy: 2 more in flight than e1
    assert router.choose(prompt) == 1
    router.outstanding[0] = 1
    assert router.choose(prompt) == 0


async def test_failover_health_checks_and_recovery():
    router, clients = make_router(2)
    await router.generate([1], PARAMS, session_id="s")
    home = next(i for i, c in enumerate(clients) if c.calls)
    clients[home].down = True
    out = await router.generate([1, 2], PARAMS, session_id="s")  # retried on the other engine
    assert out["output_ids"] and router.healthy == [i != home for i in range(2)]
    assert len(clients[1 - home].calls) == 1
    assert router.choose([3], "s") == 1 - home  # the session moved
    assert await router.check_health() == [i != home for i in range(2)]  # still down
    clients[home].down = False
    assert await router.check_health() == [True, True]  # back in rotation
    for c in clients:
        c.down = True
    with pytest.raises(NoHealthyEngineError, match="no healthy engine"):
        await router.generate([4], PARAMS)


async def test_periodic_health_checks():
    router, clients = make_router(2)
    clients[0].healthy = False
    router.start_health_checks(interval=0.01)
    try:
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not router.healthy[0]:
                break
        assert router.healthy == [False, True]
        clients[0].healthy = True
        for _ in range(100):
            await asyncio.sleep(0.01)
            if router.healthy[0]:
                break
        assert router.healthy == [True, True]
    finally:
        router.stop_health_checks()


async def test_outstanding_counts_balance_concurrent_requests():
    router, clients = make_router(2, token_delay=0.002)
    await asyncio.gather(*(router.generate([k], PARAMS) for k in range(8)))
    assert [len(c.calls) for c in clients] == [4, 4]
    assert max(c.max_in_flight for c in clients) == 4 and router.outstanding == [0, 0]


async def test_abort_all_and_flush_reach_every_engine():
    router, clients = make_router(2, token_delay=0.01)
    task = asyncio.ensure_future(router.generate([1, 2, 3], {"max_new_tokens": 50}))
    await asyncio.sleep(0.025)
    await router.abort_all()
    out = await task
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and 0 < len(out["output_ids"]) < 7
    assert [c.aborts for c in clients] == [1, 1]
    await router.generate([1, 2, 3, 4, 5], PARAMS)
    await router.flush_cache()
    assert router.choose([1, 2, 3, 4, 5]) in (0, 1) and not any(router._prefixes)


async def test_a_stalled_engine_is_reported_within_the_health_timeout_and_its_requests_move(caplog):
    router, clients = make_router(2, health_timeout=0.2)
    clients[0].stalled = True
    first = asyncio.ensure_future(router.generate([1], PARAMS))  # least loaded, round robin: e0 (stalled)
    await asyncio.sleep(0.05)
    assert router.outstanding == [1, 0]
    second = asyncio.ensure_future(router.generate([2], PARAMS))  # e1
    assert (await second)["meta_info"]["finish_reason"]["type"] == "length"  # max_new_tokens 4 < the fake's 6
    assert not first.done()  # stuck on the stalled engine ...
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await router.check_health() == [False, True]  # ... until a health check times out on it
    assert loop.time() - start < 1.0  # bounded by the health timeout, not a request timeout
    out = await asyncio.wait_for(first, 2.0)  # moved to e1 and answered there
    assert out["meta_info"]["finish_reason"]["type"] == "length" and len(out["output_ids"]) == 4
    assert [c["input_ids"] for c in clients[1].calls] == [[2], [1]]
    assert router.outstanding == [0, 0]
    assert "no answer to a health check within 0.2s" in caplog.text


async def test_cancelling_a_request_cancels_it_on_the_engine():
    router, clients = make_router(1, token_delay=0.05)
    task = asyncio.ensure_future(router.generate([1, 2], PARAMS))
    await asyncio.sleep(0.02)
    assert clients[0].in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert clients[0].in_flight == 0 and router.outstanding == [0]


async def test_replace_client_puts_a_restarted_engine_back_without_its_old_routes():
    router, clients = make_router(2)
    await router.generate([1, 2, 3, 4, 5], PARAMS, session_id="s")
    home = next(i for i, c in enumerate(clients) if c.calls)
    clients[home].down = True
    await router.generate([1, 2, 3, 4, 6], PARAMS, session_id="s")  # fails over to the other engine
    assert router.healthy[home] is False
    fresh = type(clients[0])(f"e{home}-restarted")
    router.replace_client(home, fresh)
    assert router.healthy == [True, True] and router.clients[home] is fresh
    assert router.choose([1, 2, 3, 4, 7], session_id="s") == 1 - home  # the session stays where it moved


async def test_rotation_changes_are_kept_for_the_caller_to_log():
    router, clients = make_router(2, health_timeout=0.2)
    assert router.take_events() == []
    clients[0].stalled = True
    assert await router.check_health() == [False, True]
    clients[0].stalled = False
    assert await router.check_health() == [True, True]
    router.replace_client(1, type(clients[0])("e1-restarted"))
    assert router.take_events() == [
        {"engine": 0, "in_rotation": False,
         "message": "engine 0 (e0) leaves the rotation: no answer to a health check within 0.2s (stalled?)"},
        {"engine": 0, "in_rotation": True, "message": "engine 0 (e0) is back in rotation"},
        {"engine": 1, "in_rotation": False, "message": "engine 1 (e1) leaves the rotation: replaced"},
        {"engine": 1, "in_rotation": True, "message": "engine 1 (e1-restarted) is in rotation (restarted)"}]
    assert router.take_events() == []
