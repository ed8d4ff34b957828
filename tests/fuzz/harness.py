"""How the fuzz tests run: one settings profile, a count of the cases run, and the checks
every addon fuzz test makes of a flow.

`MODGUD_FUZZ_EXAMPLES` sets the examples per test. Unset (the unit run, CI), each test runs
DEFAULT_EXAMPLES derandomized examples: the same inputs on every run. Set (`make fuzz`), the
examples are drawn from the seed given with `--hypothesis-seed`, so a long run is
reproducible too:

    MODGUD_FUZZ_EXAMPLES=4000 .venv/bin/python -m pytest -q -p no:cacheprovider \
        tests/fuzz --hypothesis-seed=20261123

The number of cases actually run is printed at the end of the session ("modgud fuzz: …").
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings

__all__ = [
    "CASES",
    "DEFAULT_EXAMPLES",
    "EXAMPLES",
    "assert_forwarded_untouched_or_answered",
    "fuzz",
    "internal_errors",
    "request_snapshot",
]

EXAMPLES_ENV = "MODGUD_FUZZ_EXAMPLES"
DEFAULT_EXAMPLES = 100
_configured = os.environ.get(EXAMPLES_ENV)
EXAMPLES = int(_configured) if _configured else DEFAULT_EXAMPLES

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=not _configured,
    database=None,  # nothing written to .hypothesis/; a failure prints its reproducer
    deadline=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)

# Cases run, by test: the session's total is printed by tests/fuzz/conftest.py.
CASES: dict[str, int] = {}


def fuzz(*strategies: Any, **named: Any) -> Callable[[Callable[..., Any]], Any]:
    """`@given` with the fuzz settings, counting each case run; sync and async tests."""

    def decorate(test: Callable[..., Any]) -> Any:
        name = f"{test.__module__}.{test.__name__}"
        CASES.setdefault(name, 0)
        if inspect.iscoroutinefunction(test):

            @functools.wraps(test)
            async def counted_async(*args: Any, **kwargs: Any) -> Any:
                CASES[name] += 1
                return await test(*args, **kwargs)

            wrapped: Callable[..., Any] = counted_async
        else:

            @functools.wraps(test)
            def counted(*args: Any, **kwargs: Any) -> Any:
                CASES[name] += 1
                return test(*args, **kwargs)

            wrapped = counted
        return FUZZ_SETTINGS(given(*strategies, **named)(wrapped))

    return decorate


def internal_errors(runtime: Any) -> float:
    """modgud_internal_errors_total over every place: a bug the fuzzer found."""
    total = 0.0
    for family in runtime.metrics.registry.collect():
        if family.name == "modgud_internal_errors":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def request_snapshot(flow: Any) -> dict[str, Any]:
    """Everything of the request that the homeserver would receive."""
    return copy.deepcopy(flow.request.get_state())


def assert_forwarded_untouched_or_answered(flow: Any, before: dict[str, Any]) -> None:
    """The homeserver receives the original request or nothing: either modgud answered
    (flow.response set, with a JSON body), or the request is byte-identical."""
    if flow.response is not None:
        assert flow.response.status_code in (200, 400, 401, 403, 404, 413, 503)
        json.loads(flow.response.content)
        return
    assert flow.request.get_state() == before
