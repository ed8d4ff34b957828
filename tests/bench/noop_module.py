"""The least any Synapse spam-checker module costs: a check_event_for_spam callback that
answers NOT_SPAM at once (tests/bench/synapse.py's `noop` path; copied next to Synapse's
homeserver.yaml, which `python -m` puts on sys.path)."""

from typing import Any

from synapse.module_api import NOT_SPAM, ModuleApi


class NoopModule:
    def __init__(self, config: Any, api: ModuleApi) -> None:
        api.register_spam_checker_callbacks(check_event_for_spam=self.check_event_for_spam)

    async def check_event_for_spam(self, event: Any) -> Any:
        return NOT_SPAM
