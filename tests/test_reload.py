"""Reload rules without a daemon: what a new config keeps, adds and drops."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from routerd.config.load import parse_config
from routerd.config.schema import Config, ServerConfig
from routerd.config.secrets import Secret, resolve_secrets
from routerd.core.breaker import Breaker
from routerd.core.credential import CredentialState, Health, LocalLimit
from routerd.core.plan import Target
from routerd.dispatch.actor import CredentialActor
from routerd.reload import plan_credentials, restart_needed, retarget
from tests.test_config import BASE

CREATED: list[CredentialActor] = []

ENV = {"OPENAI_API_KEY": "sk-main-1", "OPENAI_CI_KEY": "sk-ci-1", "ANTHROPIC_API_KEY": "sk-a-1"}


def secrets_of(config: Config, env: dict[str, str]) -> list[Secret]:
    return resolve_secrets(config, environ=env)


def actor_for(secret: Secret, order: int) -> CredentialActor:
    state = CredentialState(
        provider=secret.provider,
        label=secret.label,
        fingerprint=secret.fingerprint,
        order=order,
        rpm=LocalLimit(secret.rpm) if secret.rpm else None,
    )
    actor = CredentialActor(state, secret, mailbox_size=4, on_change=lambda: None)
    CREATED.append(actor)
    return actor


@pytest.fixture(autouse=True)
def close_actors() -> Iterator[None]:
    yield
    while CREATED:
        CREATED.pop().close()


def running(config: Config) -> dict[tuple[str, str], CredentialActor]:
    return {(s.provider, s.label): actor_for(s, n) for n, s in enumerate(secrets_of(config, ENV))}


def test_an_unchanged_credential_keeps_its_cooldown_and_window_and_takes_new_limits() -> None:
    old = parse_config(BASE)
    actors = running(old)
    ci = actors[("openai", "ci")]
    ci.state.health, ci.state.until, ci.state.reason = Health.COOLING, 99.0, "429"
    ci.state.requests.remaining = 7
    assert ci.state.rpm is not None
    ci.state.rpm.spend(1, 10.0)
    new = parse_config(BASE.replace("rpm = 500", "rpm = 50"))

    plan = plan_credentials(actors, secrets_of(new, ENV), new, actor_for)

    assert plan.actors[("openai", "ci")] is ci and not plan.added and not plan.removed
    assert ci.state.health is Health.COOLING and ci.state.until == 99.0
    assert ci.state.requests.remaining == 7
    assert ci.state.rpm is not None and ci.state.rpm.limit == 50 and ci.state.rpm.total == 1


def test_a_new_key_under_the_same_label_starts_fresh_and_a_missing_one_is_dropped() -> None:
    old = parse_config(BASE)
    actors = running(old)
    actors[("openai", "main")].state.health = Health.DISABLED
    new = parse_config(
        BASE.replace('  { label = "ci", key_env = "OPENAI_CI_KEY", rpm = 500 },\n', "")
    )
    env = {**ENV, "OPENAI_API_KEY": "sk-main-2"}

    plan = plan_credentials(actors, secrets_of(new, env), new, actor_for)

    main = plan.actors[("openai", "main")]
    assert main is not actors[("openai", "main")] and main.state.health is Health.READY
    assert {(a.state.provider, a.state.label) for a in plan.added} == {("openai", "main")}
    assert {(a.state.provider, a.state.label) for a in plan.removed} == {
        ("openai", "main"),
        ("openai", "ci"),
    }
    assert ("openai", "ci") not in plan.actors
    assert plan.kept == [("anthropic", "team")]


def test_a_target_keeps_its_breaker_and_takes_the_new_settings() -> None:
    running_target = Target(
        "p/m", "p", "m", "openai", "headroom", Breaker("p/m", 3, 5.0, 120.0), pool=[]
    )
    running_target.breaker.failures = 4
    running_target.token_scale = 1.5
    fresh = Target(
        "p/m",
        "p",
        "m",
        "openai",
        "round_robin",
        Breaker("p/m", 1, 2.0, 10.0),
        pool=[],
        context_window=8000,
    )

    retarget(running_target, fresh)

    assert running_target.strategy == "round_robin" and running_target.context_window == 8000
    assert running_target.breaker.failures == 4 and running_target.token_scale == 1.5
    assert running_target.breaker.failure_threshold == 1 and running_target.breaker.open_s == 2.0


def test_listener_changes_are_named_as_needing_a_restart() -> None:
    old = ServerConfig(socket="/run/a.sock")
    new = ServerConfig(socket="/run/b.sock", drain_timeout_s=5.0, max_connections=10)
    assert restart_needed(old, new) == ["server.socket", "server.max_connections"]
    assert restart_needed(old, old) == []
