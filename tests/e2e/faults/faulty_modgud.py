"""modgud's Synapse module with a fault injected, for tests/e2e/test_module.py: a real
Synapse loads it (copied next to its homeserver.yaml, which `python -m` puts on sys.path)
in place of modgud_synapse.ModgudModule. Every event whose body holds `raise_on_body`
makes the module's judge raise, as a bug in modgud would; everything else is the real
module. Synapse must never see the exception: on_error decides."""

from __future__ import annotations

from typing import Any

from modgud_synapse import ModgudModule


class FaultyModgud(ModgudModule):
    @staticmethod
    def parse_config(config: dict[str, Any]) -> Any:
        options = dict(config)
        trigger = options.pop("raise_on_body")
        return ModgudModule.parse_config(options), trigger

    def __init__(self, parsed: Any, api: Any) -> None:
        config, trigger = parsed
        super().__init__(config, api)
        decide = self.judge.decide

        def faulty(event: Any, room: Any, **options: Any) -> Any:
            if trigger in str((event.get("content") or {}).get("body", "")):
                raise RuntimeError("a fault injected by the test")
            return decide(event, room, **options)

        self.judge.decide = faulty  # type: ignore[method-assign]
