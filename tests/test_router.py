"""Router: sticky sessions, prefix affinity, least-load balancing, health and fail-over, slow engines kept and dead
ones evicted (fake engine clients, a hand-moved clock for the stall window)."""

import asyncio
import logging

import pytest

from rollout.client import EngineTimeoutError
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


class Clock:
    """A monotonic clock the test moves by hand (the router's stall window is measured on it)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_a_stalled_engine_leaves_the_rotation_after_the_stall_window_and_its_requests_move(caplog):
    clock = Clock()
    router, clients = make_router(2, health_timeout=0.05, stall_window=60, clock=clock)
    clients[0].stalled = True
    first = asyncio.ensure_future(router.generate([1], PARAMS))  # least loaded, round robin: e0 (stalled)
    await asyncio.sleep(0.05)
    assert router.outstanding == [1, 0]
    second = asyncio.ensure_future(router.generate([2], PARAMS))  # e1
    assert (await second)["meta_info"]["finish_reason"]["type"] == "length"  # max_new_tokens 4 < the fake's 6
    assert await router.check_health() == [True, True]  # no answer: a slow probe, kept (silence counted from here)
    clock.t += 59
    assert await router.check_health() == [True, True]  # silent 59 s < the stall window: still kept
    assert not first.done() and router.stats[0].slow_probes == 2
    clock.t += 1
    assert await router.check_health() == [False, True]  # silent 60 s holding a request: a confirmed stall
    out = await asyncio.wait_for(first, 2.0)  # moved to e1 and answered there
    assert out["meta_info"]["finish_reason"]["type"] == "length" and len(out["output_ids"]) == 4
    assert [c["input_ids"] for c in clients[1].calls] == [[2], [1]]
    assert router.outstanding == [0, 0]
    assert ("engine 0 (e0) leaves the rotation: stalled: no answer to 3 health check(s) in a row and no finished "
            "request for 60s while it holds 1 request(s) (stall window 60s)") in caplog.text


async def test_a_request_on_the_only_engine_fails_with_the_reason_once_its_stall_is_confirmed():
    clock = Clock()
    router, clients = make_router(1, health_timeout=0.05, stall_window=60, clock=clock)
    clients[0].stalled = True   # hung: neither probes nor requests answer
    held = asyncio.ensure_future(router.generate([1, 2], PARAMS))
    await asyncio.sleep(0.01)
    assert await router.check_health() == [True] and not held.done()   # slow so far: kept, waited for
    clock.t += 60
    assert await router.check_health() == [False]   # 60 s silent while holding the request: a confirmed stall
    with pytest.raises(NoHealthyEngineError) as failure:
        await held
    assert str(failure.value) == (
        "no healthy engine left to serve the request: engine 0 (e0): stalled: no answer to 2 health check(s) in a "
        "row and no finished request for 60s while it holds 1 request(s) (stall window 60s)")
    clients[0].stalled = False   # it answers again (e.g. SIGCONT): back in rotation
    assert await router.check_health() == [True]


async def test_a_slow_probe_keeps_the_only_engine_in_rotation_and_serving(caplog):
    caplog.set_level(logging.WARNING, logger="rollout.router")
    router, clients = make_router(1, health_timeout=0.05, stall_window=60, clock=Clock())
    clients[0].slow_probes = True   # a loaded machine: the probe does not answer in time, generation goes on
    for _ in range(3):
        assert await router.check_health() == [True]
    out = await router.generate([1, 2, 3], PARAMS)
    assert len(out["output_ids"]) == 4 and router.healthy == [True]
    assert router.unanswered == [0]   # the finished request was a sign of life
    assert router.take_events() == [] and router.take_stats()[0].slow_probes == 3
    assert "engine 0 (e0): slow health check (no answer within 0.05s; 3 in a row" in caplog.text
    assert "kept in rotation (stall window 60s)" in caplog.text


class HoldsOne(FakeEngineClient):
    """A fake that keeps the request for `held_prompt` until `release` is set; the others it serves."""

    held_prompt = [7, 7]

    def __init__(self, name):
        super().__init__(name)
        self.release = asyncio.Event()

    async def generate(self, input_ids, sampling_params, return_logprob=True, session_id=None):
        if list(input_ids) == self.held_prompt:
            await self.release.wait()
        return await super().generate(input_ids, sampling_params, return_logprob, session_id)


async def test_an_engine_slow_to_answer_probes_but_making_progress_is_kept_and_its_samples_finish():
    clock = Clock()
    slow, other = HoldsOne("e0"), FakeEngineClient("e1")
    router = Router([slow, other], page_size=4, health_timeout=0.05, stall_window=60, clock=clock)
    slow.slow_probes = True   # no probe of it is ever answered in time
    held = asyncio.ensure_future(router.generate([7, 7], PARAMS, session_id="on-e0"))   # round robin: e0
    await asyncio.sleep(0.01)
    assert router.outstanding == [1, 0] and router._sessions["on-e0"] == 0
    for k in range(10):   # ten stall windows of slow probes while requests keep finishing on it every 50 s
        clock.t += 50
        await router.generate([k + 1], PARAMS, session_id="on-e0")   # the session keeps it on e0
        assert await router.check_health() == [True, True]
    assert len(slow.calls) == 10 and not held.done()
    slow.release.set()
    assert len((await held)["output_ids"]) == 4   # finished on the slow engine, not cancelled or moved
    assert other.calls == [] and router.stats[0].slow_probes == 10 and router.take_events() == []


async def test_a_held_request_on_the_only_slow_engine_waits_for_it_through_slow_probes():
    clock = Clock()
    router, clients = make_router(1, health_timeout=0.05, stall_window=60, clock=clock)
    clients[0].slow_probes = True
    clients[0].gate = asyncio.Event()
    held = asyncio.ensure_future(router.generate([1, 2], PARAMS))
    await asyncio.sleep(0.01)
    for _ in range(3):   # within the stall window: a slow engine, kept; its request is neither cancelled nor failed
        clock.t += 19
        assert await router.check_health() == [True]
    assert not held.done()
    clients[0].gate.set()
    assert len((await held)["output_ids"]) == 4 and router.healthy == [True]


async def test_an_idle_engine_with_unanswered_probes_is_kept():
    clock = Clock()
    router, clients = make_router(1, health_timeout=0.05, stall_window=60, clock=clock)
    clients[0].slow_probes = True
    for _ in range(5):   # silent for longer than the stall window, but it holds no request: nothing is stalled
        assert await router.check_health() == [True]
        clock.t += 30
    assert len((await router.generate([3], PARAMS))["output_ids"]) == 4


async def test_a_dead_engine_leaves_the_rotation_at_once_and_is_replaced():
    router, clients = make_router(2, health_timeout=0.05, stall_window=60, clock=Clock())
    clients[0].healthy = False   # it answers: not ok (a dead scheduler thread, a stall it measured itself)
    assert await router.check_health() == [False, True]
    assert router.take_events()[0]["message"] == "engine 0 (e0) leaves the rotation: health check failed " \
                                                 "(answered False)"
    fresh = FakeEngineClient("e0-restarted")
    router.replace_client(0, fresh)
    assert await router.check_health() == [True, True]
    await asyncio.gather(*(router.generate([k], PARAMS) for k in range(4)))
    assert len(fresh.calls) == 2


class TimesOutOnce(FakeEngineClient):
    """A fake whose first request times out (EngineTimeoutError: slow, not dead)."""

    async def generate(self, input_ids, sampling_params, return_logprob=True, session_id=None):
        if not self.calls:
            self.calls.append({"input_ids": list(input_ids)})
            raise EngineTimeoutError(f"{self.name}/generate timed out")
        return await super().generate(input_ids, sampling_params, return_logprob, session_id)


async def test_a_timed_out_request_is_retried_on_the_only_engine_which_stays_in_rotation():
    client = TimesOutOnce("slow")
    router = Router([client], page_size=4)
    out = await router.generate([1, 2], PARAMS)
    assert len(out["output_ids"]) == 4 and router.healthy == [True]
    assert len(client.calls) == 2 and router.stats[0].timeouts == 1 and router.stats[0].failures == 0


async def test_a_timed_out_request_moves_to_another_engine_in_rotation():
    slow, other = TimesOutOnce("slow"), FakeEngineClient("other")
    router = Router([slow, other], page_size=4)
    out = await router.generate([1, 2], PARAMS)
    assert len(out["output_ids"]) == 4 and router.healthy == [True, True] and len(other.calls) == 1


def test_the_stall_window_is_at_least_the_probe_timeout():
    with pytest.raises(ValueError, match=r"stall_window = 5: expected seconds >= health_timeout \(10.0\)"):
        Router([FakeEngineClient()], health_timeout=10.0, stall_window=5)


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
    clock = Clock()
    router, clients = make_router(2, health_timeout=0.05, stall_window=60, clock=clock)
    assert router.take_events() == []
    clients[0].healthy = False
    assert await router.check_health() == [False, True]
    clients[0].healthy = True
    assert await router.check_health() == [True, True]
    router.replace_client(1, type(clients[0])("e1-restarted"))
    assert router.take_events() == [
        {"engine": 0, "in_rotation": False,
         "message": "engine 0 (e0) leaves the rotation: health check failed (answered False)"},
        {"engine": 0, "in_rotation": True, "message": "engine 0 (e0) is back in rotation"},
        {"engine": 1, "in_rotation": False, "message": "engine 1 (e1) leaves the rotation: replaced"},
        {"engine": 1, "in_rotation": True, "message": "engine 1 (e1-restarted) is in rotation (restarted)"}]
    assert router.take_events() == []
