"""Connection caps derived from the descriptor limit."""

from __future__ import annotations

import resource

from routerd.fdlimit import RESERVED_FDS, raise_soft_limit, shares


def test_caps_fit_under_the_usual_soft_limit() -> None:
    per_listener, upstream = shares(1024, listeners=3, configured=1000)
    assert per_listener == upstream == (1024 - RESERVED_FDS) // 4
    assert 3 * per_listener + upstream + RESERVED_FDS <= 1024


def test_the_configured_cap_wins_when_descriptors_are_plentiful() -> None:
    assert shares(65536, listeners=2, configured=500) == (500, 1000)


def test_a_tiny_limit_still_leaves_one_connection_each() -> None:
    assert shares(10, listeners=3, configured=1000) == (1, 1)


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if before[1] != resource.RLIM_INFINITY and before[1] > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, before[1]))
            assert raise_soft_limit() == before[1]
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == before[1]
        else:
            assert raise_soft_limit() >= 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
