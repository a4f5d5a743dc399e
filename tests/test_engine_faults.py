"""Engines that fail loudly: the health report and /health's 503, requests to a released engine refused at once,
a stalled engine reported, a SIGSTOPped server routed around, Ray actor deaths as EngineUnavailableError, and the
driver's fault-tolerance decisions (no Ray: the end-to-end restart is in test_train.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi", reason="the HTTP server needs fastapi")

from inference_engine import Engine
from inference_engine.config import ServerConfig
from inference_engine.server import create_app
from kiln_common.errors import EngineNotServingError
from kiln_common.net import free_port
from orchestrator.cli import ConfigError
from orchestrator.driver import Driver, EngineFailureError, parse_args, resolve
from rollout.client import EngineTimeoutError, EngineUnavailableError, HttpEngineClient, LocalEngineClient
from rollout.router import Router

REPO = Path(__file__).resolve().parents[1]
GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
KEY = "k" * 32


def app_client(engine: Engine, **server) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=app_transport(engine, **server), base_url="http://engine")


def app_transport(engine: Engine, **server) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=create_app(engine, ServerConfig(**server)))


async def test_health_reports_the_engine_and_answers_503_naming_why_when_the_scheduler_thread_is_dead(qwen3_model):
    engine = Engine(model_path=str(qwen3_model), max_total_tokens=256, context_length=64)
    try:
        async with app_client(engine, api_key=KEY) as client:   # /health needs no token
            r = await client.get("/health")
            report = r.json()
            assert r.status_code == 200 and report["ok"] is True and report["reason"] is None
            assert report["scheduler_alive"] and report["tp_workers_alive"] and report["stall_s"] == 0
            assert report["memory_released"] is False and report["weight_version"] == 0
            assert report["running"] == 0 and report["queued"] == 0 and KEY not in r.text
            engine._inbox.put(("stop",))   # the scheduler thread ends, as after an uncaught error
            engine._thread.join(30)
            r = await client.get("/health")
            assert r.status_code == 503
            assert r.json()["ok"] is False and r.json()["scheduler_alive"] is False
            assert r.json()["reason"] == "the scheduler thread is not running (its log says why)"
            http = HttpEngineClient("http://engine", api_key=KEY, transport=app_transport(engine, api_key=KEY))
            assert await http.health() is False
            assert await LocalEngineClient(engine).health() is False
            r = await client.post("/generate", json={"input_ids": [5, 6], "sampling_params": GREEDY},
                                  headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 503 and "scheduler thread is not running" in r.text
    finally:
        engine.shutdown()


async def test_a_request_to_a_released_engine_fails_at_once_with_a_clear_error(qwen3_model):
    engine = Engine(model_path=str(qwen3_model), max_total_tokens=256, context_length=64)
    try:
        engine.release_memory()
        report = engine.health()
        assert report["ok"] is True and report["memory_released"] is True   # alive: it refuses, it does not hang
        with pytest.raises(EngineNotServingError, match=r"memory is released \(release_memory\)"):
            engine.generate(input_ids=[5, 6], sampling_params=GREEDY)
        with pytest.raises(EngineNotServingError, match="resume_memory"):
            await asyncio.wait_for(engine.async_generate(input_ids=[5, 6], sampling_params=GREEDY), 30)
        with pytest.raises(EngineUnavailableError, match="memory is released"):   # a router would retry elsewhere
            await asyncio.wait_for(LocalEngineClient(engine, name="e0").generate([5, 6], GREEDY), 30)
        async with app_client(engine) as client:
            r = await asyncio.wait_for(client.post("/generate", json={"input_ids": [5, 6],
                                                                      "sampling_params": GREEDY}), 30)
            assert r.status_code == 503 and "memory is released" in r.json()["error"]["message"]
        # a request that passed the check just before release_memory ran is refused by the scheduler thread too
        engine._check_serving = lambda: None
        with pytest.raises(EngineNotServingError, match="memory is released"):
            await asyncio.wait_for(engine.async_generate(input_ids=[5, 6], sampling_params={**GREEDY, "n": 2}), 30)
        del engine._check_serving
        engine.resume_memory()
        assert len(engine.generate(input_ids=[5, 6], sampling_params=GREEDY)["output_ids"]) == 4
    finally:
        engine.shutdown()


def test_an_engine_with_work_and_no_step_reports_a_stall(qwen3_model):
    engine = Engine(model_path=str(qwen3_model), max_total_tokens=256, context_length=64, stall_timeout_s=0.2)
    release = threading.Event()
    step = engine.scheduler.step
    engine.scheduler.step = lambda: (release.wait(60), step())   # stuck in a step, as in a collective with no peer
    try:
        result = []
        worker = threading.Thread(target=lambda: result.append(engine.generate(input_ids=[5, 6],
                                                                              sampling_params=GREEDY)))
        worker.start()
        deadline = time.monotonic() + 30
        while engine.health()["ok"] and time.monotonic() < deadline:
            time.sleep(0.05)
        report = engine.health()
        assert report["ok"] is False and report["stall_s"] > 0.2 and report["scheduler_alive"]
        assert report["reason"].startswith("stalled: no scheduler step for ")
        assert "(stall_timeout_s 0.2)" in report["reason"]
        release.set()
        worker.join(60)
        assert len(result[0]["output_ids"]) == 4
        while not engine.health()["ok"] and time.monotonic() < deadline:   # steps again: the stall is over
            time.sleep(0.05)
        assert engine.health()["stall_s"] < 0.2
    finally:
        release.set()
        engine.shutdown()


class _DeadActorMethod:
    """An actor method whose actor is gone: `.remote()` gives an awaitable that raises Ray's ActorDiedError."""

    def remote(self, *args, **kwargs):
        from ray.exceptions import ActorDiedError

        async def died():
            raise ActorDiedError()
        return died()


class _DeadActor:
    async_generate = health = abort = flush_cache = _DeadActorMethod()


async def test_a_dead_engine_actor_is_engine_unavailable_so_the_router_retries_elsewhere():
    pytest.importorskip("ray")
    client = LocalEngineClient(_DeadActor(), name="default-engine-1")
    with pytest.raises(EngineUnavailableError, match=r"engine default-engine-1 \(Ray actor\) is gone: ActorDiedError"):
        await client.generate([1, 2], GREEDY)
    assert await client.health() is False
    from rollout.testing import FakeEngineClient

    live = FakeEngineClient("e0")
    router = Router([client, live], page_size=4)
    out = await router.generate([1, 2], {"max_new_tokens": 3})
    assert len(out["output_ids"]) == 3 and router.healthy == [False, True] and router.stats[0].failures == 1


async def test_a_sigstopped_engine_server_is_reported_within_the_health_timeout_and_routed_around(qwen3_model,
                                                                                                  caplog):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    ports = [free_port(), free_port()]
    servers = [subprocess.Popen([sys.executable, "-m", "inference_engine.serve", "--model-path", str(qwen3_model),
                                 "--host", "127.0.0.1", "--port", str(port), "--max-total-tokens", "256",
                                 "--context-length", "64", "--log-level", "warning"], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
               for port in ports]
    clients = [HttpEngineClient(f"http://127.0.0.1:{port}", max_retries=0) for port in ports]
    stopped = None
    try:
        for server, client in zip(servers, clients):
            deadline = time.monotonic() + 180
            while not await client.health():
                assert server.poll() is None, f"engine server exited with {server.returncode}"
                assert time.monotonic() < deadline, "engine server did not come up"
                await asyncio.sleep(0.5)
        router = Router(clients, page_size=4, health_timeout=2.0, stall_window=2.0)
        await router.generate([5, 6, 7], GREEDY, session_id="episode")   # the episode's engine: round robin, 0
        home = router._sessions["episode"]
        stopped = servers[home]
        os.kill(stopped.pid, signal.SIGSTOP)
        stuck = asyncio.ensure_future(router.generate([5, 6, 7, 8], GREEDY, session_id="episode"))
        await asyncio.sleep(0.5)
        assert not stuck.done()   # waiting on the stopped engine
        caplog.set_level(logging.WARNING, logger="rollout.router")
        loop = asyncio.get_running_loop()
        start = loop.time()
        healthy = await router.check_health()
        assert loop.time() - start < router.health_timeout + 1.0   # reported within the health timeout
        assert healthy == [i != home for i in range(2)]   # silent > the 2 s stall window while holding a request
        out = await asyncio.wait_for(stuck, 60)   # cancelled on the stopped engine, answered by the other
        assert len(out["output_ids"]) == 4 and router._sessions["episode"] == 1 - home
        more = await asyncio.gather(*(router.generate([9, k], GREEDY) for k in range(4)))
        assert all(len(o["output_ids"]) == 4 for o in more) and router.stats[1 - home].requests == 5
        [event] = router.take_events()
        assert event["message"].startswith(
            f"engine {home} ({clients[home].name}) leaves the rotation: stalled: no answer to 1 health check(s) in a "
            "row and no finished request for ")
        assert event["message"].endswith("while it holds 1 request(s) (stall window 2s)")
        assert event["message"] in caplog.text
    finally:
        if stopped is not None:
            os.kill(stopped.pid, signal.SIGCONT)
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(30)
        for client in clients:
            await client.aclose()


# ---- the driver's decisions -------------------------------------------------------------------------------------


def _driver(model, **extra) -> Driver:
    return Driver(resolve({"hf-checkpoint": str(model), "prompt-data": "x.jsonl", **extra}))


FAULT = [("default", 1, "the actor died (ActorDiedError: the actor is dead)")]


def test_no_fault_tolerance_stops_the_run_with_one_error_naming_the_engine_and_why(qwen3_model):
    driver = _driver(qwen3_model, **{"fault-tolerance": False})
    with pytest.raises(EngineFailureError) as failure:
        driver._handle_engine_faults(4, FAULT)
    message = str(failure.value)
    assert message.startswith("step 5: 1 engine(s) failed and --no-fault-tolerance is set, so the run stops: ")
    assert f"kiln-engine-default-1-{driver.run_id}: the actor died (ActorDiedError" in message
    driver._handle_engine_faults(4, [])   # nothing failed: nothing happens


def test_restarts_beyond_the_limit_stop_the_run(qwen3_model):
    driver = _driver(qwen3_model, **{"max-engine-restarts": 2})
    driver.engine_restarts = 2
    with pytest.raises(EngineFailureError, match=r"would exceed --max-engine-restarts 2 \(2 restart\(s\) so far\)"):
        driver._handle_engine_faults(0, FAULT)


def test_main_reports_an_engine_failure_in_one_line_and_exits_1(qwen3_model, monkeypatch, caplog, tmp_path):
    data = tmp_path / "train.jsonl"   # main checks the prompt data before anything starts
    data.write_text(json.dumps({"prompt": "What is 1 + 1?", "label": "2"}) + "\n")

    def fail(self):
        raise EngineFailureError("step 2: 1 engine(s) failed and --no-fault-tolerance is set, so the run stops: x")
    monkeypatch.setattr(Driver, "setup", lambda self: None)
    monkeypatch.setattr(Driver, "run", fail)
    from orchestrator.driver import main

    with pytest.raises(SystemExit) as exit_:
        main(["--hf-checkpoint", str(qwen3_model), "--prompt-data", str(data), "--no-fault-tolerance"])
    assert exit_.value.code == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "--no-fault-tolerance is set" in errors[0].getMessage()


def test_fault_tolerance_flags(qwen3_model):
    base = ["--hf-checkpoint", str(qwen3_model), "--prompt-data", "x.jsonl"]
    run = parse_args(base).run
    assert run.fault_tolerance is True and run.max_engine_restarts == 3 and run.engine_health_timeout == 10.0
    run = parse_args(base + ["--no-fault-tolerance", "--max-engine-restarts", "0",
                             "--engine-health-timeout", "2.5"]).run
    assert run.fault_tolerance is False and run.max_engine_restarts == 0 and run.engine_health_timeout == 2.5
    with pytest.raises((ConfigError, ValueError), match=r"max_engine_restarts = -1: expected an integer >= 0"):
        parse_args(base + ["--max-engine-restarts", "-1"])
    with pytest.raises((ConfigError, ValueError), match=r"engine_health_timeout = 0.0: expected a number of seconds"):
        parse_args(base + ["--engine-health-timeout", "0"])


class _Probe:
    """A fake Ray ObjectRef of one engine's health() call: `answer` (a report, or an exception ray.get raises),
    given `when`: 'now' (within --engine-health-timeout), 'late' (after it, within --engine-stall-window) or
    'never'."""

    def __init__(self, answer, when="now"):
        self.answer, self.when = answer, when


class _ProbedEngine:
    def __init__(self, probe):
        self.health = type("Method", (), {"remote": staticmethod(lambda: probe)})()


def _fake_ray(monkeypatch):
    """ray.wait / ray.get over _Probe refs: the first wait (the probe timeout) sees the 'now' answers, the second
    (the rest of the stall window) the 'late' ones too. Returns the timeouts the driver waited with."""
    ray = pytest.importorskip("ray")
    timeouts = []

    def wait(refs, num_returns, timeout):
        timeouts.append(timeout)
        ready = [r for r in refs if r.when == "now" or (r.when == "late" and len(timeouts) > 1)]
        return ready, [r for r in refs if r not in ready]

    def get(ref):
        if isinstance(ref.answer, BaseException):
            raise ref.answer
        return ref.answer
    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", get)
    return timeouts


OK = {"ok": True, "reason": None}


def test_the_engine_check_keeps_a_slow_engine_and_restarts_only_dead_or_stalled_ones(qwen3_model, monkeypatch,
                                                                                     caplog):
    from ray.exceptions import ActorDiedError

    timeouts = _fake_ray(monkeypatch)
    driver = _driver(qwen3_model, **{"engine-health-timeout": 10, "engine-stall-window": 120})
    driver.engines = {"default": [_ProbedEngine(_Probe(OK)), _ProbedEngine(_Probe(OK, "late")),
                                  _ProbedEngine(_Probe(ActorDiedError())),
                                  _ProbedEngine(_Probe({"ok": False, "reason": "the scheduler thread is not running"})),
                                  _ProbedEngine(_Probe(OK, "never"))]}
    restarted = []
    monkeypatch.setattr(Driver, "_restart_engines", lambda self, step, failed: restarted.extend(failed))
    caplog.set_level(logging.WARNING, logger="orchestrator.driver")
    driver._handle_engine_faults(0, driver._engine_faults())
    assert timeouts == [10, 110]   # the probe timeout, then the rest of the stall window for the slow ones
    assert restarted == [("default", 2), ("default", 3), ("default", 4)]   # not engine 1: slow, alive
    assert f"engine {driver.engine_name('default', 1)}: slow health check (no answer within " \
           "--engine-health-timeout 10s); waiting up to --engine-stall-window 120s" in caplog.text
    assert "the actor died (ActorDiedError" in caplog.text
    assert "it reports itself unhealthy: the scheduler thread is not running" in caplog.text
    assert "stalled: no answer to a health check for 120s (--engine-stall-window)" in caplog.text


def test_the_engine_check_does_not_restart_the_only_engine_when_its_probe_is_slow(qwen3_model, monkeypatch):
    timeouts = _fake_ray(monkeypatch)
    driver = _driver(qwen3_model)
    driver.engines = {"default": [_ProbedEngine(_Probe(OK, "late"))]}
    assert driver._engine_faults() == [] and timeouts == [10.0, 290.0]   # the defaults: 10 s probe, 300 s window


def test_engine_stall_window_flag(qwen3_model):
    base = ["--hf-checkpoint", str(qwen3_model), "--prompt-data", "x.jsonl"]
    assert parse_args(base).run.engine_stall_window == 300.0
    assert parse_args(base + ["--engine-stall-window", "45"]).run.engine_stall_window == 45.0
    with pytest.raises((ConfigError, ValueError), match=r"engine_stall_window = 5: expected at least "
                                                        r"--engine-health-timeout \(10 s\)"):
        parse_args(base + ["--engine-stall-window", "5"])


async def test_an_http_health_probe_that_times_out_is_slow_not_unhealthy():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("the engine is busy", request=request)
    client = HttpEngineClient("http://engine", transport=httpx.MockTransport(handler), max_retries=0)
    with pytest.raises(EngineTimeoutError, match=r"http://engine/health timed out"):
        await client.health()
    with pytest.raises(EngineTimeoutError):
        await client.generate([1, 2], GREEDY)
    router = Router([client], page_size=4, health_timeout=5.0, stall_window=60.0)
    assert await router.check_health() == [True] and router.stats[0].slow_probes == 1   # kept in rotation
    await client.aclose()


def test_a_probe_timeout_longer_than_the_default_stall_window_widens_it(qwen3_model):
    """slime's --rollout-health-check-timeout 600 alone is a valid run: the stall window follows the probe timeout
    unless it is given; given and shorter, it is refused."""
    driver = _driver(qwen3_model, **{"engine-health-timeout": 600})
    assert driver.cfg.run.engine_stall_window == 600
    assert _driver(qwen3_model).cfg.run.engine_stall_window == 300
    with pytest.raises(ConfigError, match="engine_stall_window = 60: expected at least --engine-health-timeout"):
        _driver(qwen3_model, **{"engine-health-timeout": 600, "engine-stall-window": 60})
