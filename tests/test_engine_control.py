"""The engine's control surface is defined once (`inference_engine.control`): the Engine implements it with the
protocol's signatures, and the Ray actor, its proxy, the HTTP app and the tp workers expose exactly its members."""

import inspect

import pytest

from inference_engine import Engine, control
from inference_engine.control import MEMBERS, EngineControl
from inference_engine.tp_worker import RankWeights
from orchestrator.actors import EngineActor, EngineProxy
from weight_sync.testing import TensorDictEngine

# routes of the HTTP app that are not members of the control surface: OpenAI's API and FastAPI's own pages
NON_CONTROL_ROUTES = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/openapi.json", "/docs",
                      "/docs/oauth2-redirect", "/redoc"}
WEIGHT_MEMBERS = ("pause_generation", "continue_generation", "update_weights_from_tensor",
                  "update_weights_from_distributed", "update_weights_from_disk", "init_weights_update_group",
                  "destroy_weights_update_group", "weight_checksums", "named_hf_tensors", "metrics", "weight_version")


def _public(cls) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def _params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def test_the_member_table_lists_exactly_the_protocol():
    assert set(MEMBERS) == control.declared_members()
    assert [name for name, m in MEMBERS.items() if m.is_attribute] == ["weight_version"]
    assert [name for name, m in MEMBERS.items() if m.is_async] == ["async_generate"]


def test_engine_implements_every_member_with_the_protocols_signature():
    for name, member in MEMBERS.items():
        ours = inspect.getattr_static(Engine, name)
        if member.is_attribute:
            assert isinstance(ours, property), name
        else:
            assert _params(ours) == _params(getattr(EngineControl, name)), name
            assert inspect.iscoroutinefunction(ours) == member.is_async, name


def test_actor_and_proxy_expose_exactly_the_protocol():
    assert _public(EngineActor) - {"LIFECYCLE"} == set(MEMBERS) | set(EngineActor.LIFECYCLE)
    assert _public(EngineProxy) == set(MEMBERS)
    for name, member in MEMBERS.items():
        assert inspect.iscoroutinefunction(getattr(EngineActor, name)), name   # Ray runs them on the actor's loop
        assert getattr(EngineActor, name).__doc__ == member.doc != "", name
        assert isinstance(inspect.getattr_static(EngineProxy, name), property) == member.is_attribute, name


def test_the_test_double_has_the_protocols_weight_members():
    for name in WEIGHT_MEMBERS:
        if MEMBERS[name].is_attribute:
            assert hasattr(TensorDictEngine({}), name)
        else:
            assert _params(getattr(TensorDictEngine, name)) == _params(getattr(EngineControl, name)), name


def test_tp_workers_run_exactly_the_members_marked_for_every_rank():
    assert {n for n, m in MEMBERS.items() if m.tp_ranks} == _public(RankWeights) - {"runner", "receiver"}
    for name in (n for n, m in MEMBERS.items() if m.tp_ranks):
        assert [p for p, _ in _params(getattr(RankWeights, name))] == [p for p, _ in _params(getattr(Engine, name))]


def test_bind_names_missing_unknown_and_badly_typed_fields():
    assert control.bind("pause_generation") == {"mode": "pause"}
    with pytest.raises(ValueError, match=r"update_weights_from_disk needs field\(s\) \['weight_version'\]"):
        control.bind("update_weights_from_disk", kwargs={"model_path": "/m"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        control.bind("flush_cache", kwargs={"bogus": 1})
    args = control.bind("init_weights_update_group", kwargs={"master_address": "h", "master_port": "1",
                                                            "rank_offset": 1, "world_size": 2, "group_name": "g"})
    with pytest.raises(ValueError, match="field 'master_port' = '1' does not fit int"):
        control.check_json_types("init_weights_update_group", args)
    control.check_json_types("update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"],
                                                                 "shapes": [[2, 3]], "group_name": "g",
                                                                 "weight_version": 3})
    with pytest.raises(ValueError, match="field 'weight_version' = True"):
        control.check_json_types("update_weights_from_disk", {"model_path": "/m", "weight_version": True})


@pytest.fixture(scope="module")
def engine(qwen3_model):
    with Engine(model_path=str(qwen3_model), max_total_tokens=256, context_length=64) as eng:
        yield eng


def test_http_app_serves_exactly_the_members_with_a_route(engine):
    pytest.importorskip("fastapi", reason="the HTTP server needs fastapi")
    from fastapi.routing import APIRoute

    from inference_engine.server import create_app

    from inference_engine.server import NOT_OVER_HTTP

    app = create_app(engine)
    served = {route.path for route in app.routes} - NON_CONTROL_ROUTES - set(NOT_OVER_HTTP)
    assert served == {m.route for m in MEMBERS.values() if m.route is not None}
    generated = {route.name: route for route in app.routes if isinstance(route, APIRoute) and route.name in MEMBERS}
    for name, member in MEMBERS.items():
        if member.route is not None and member.generated_route:
            assert generated[name].path == member.route and generated[name].methods == set(member.http_methods)


def test_engine_health_reflects_its_scheduler(qwen3_model):
    eng = Engine(model_path=str(qwen3_model), max_total_tokens=256, context_length=64)
    assert eng.health()["ok"] is True
    eng.shutdown()
    report = eng.health()
    assert report["ok"] is False and report["reason"] == "the engine is shut down"


def test_a_shut_down_engine_is_freed_when_dropped(qwen3_model):
    """A finished request (kept by the radix cache and the scheduler) no longer holds its caller's callback, so a
    dropped engine is freed at once, not at some later garbage collection: an evaluation that builds its engines one
    after another on one GPU needs the last one's memory back before the next one sizes its KV pool."""
    import gc
    import weakref

    eng = Engine(model_path=str(qwen3_model), max_total_tokens=256, context_length=64)
    eng.generate(input_ids=[[1, 2, 3]], sampling_params={"max_new_tokens": 4})
    ref = weakref.ref(eng)
    eng.shutdown()
    gc.disable()
    try:
        del eng
        assert ref() is None
    finally:
        gc.enable()
