"""Machine log lines → template + parameters, mined online with drain3.

drain3 clusters lines of the same token count and replaces the tokens that vary with `<*>`. Its tokens
are the line's white-space separated words, so every parameter is reported as the exact character span
of its word in the original line (grounded by construction). A cluster's template generalises as lines
arrive (`a 1` then `a <*>`): `cluster` (drain3's id, kept across restarts with a state file) names the
group, `template_id` (a hash of the template text, the same on every gateway) names the current template.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from ..config import LogTemplateTaskConfig
from ..message import Note

_WORD = re.compile(r"\S+")
WILDCARD = "<*>"


def template_id(template: str) -> str:
    return hashlib.blake2b(template.encode(), digest_size=8).hexdigest()


def parameters(template: str, text: str) -> list[dict[str, Any]]:
    """Spans of the words of `text` that stand where `template` has `<*>` (same word count, else none)."""
    words = list(_WORD.finditer(text))
    slots = template.split()
    if len(words) != len(slots):
        return []
    return [
        {"text": m.group(), "start": m.start(), "end": m.end()}
        for m, slot in zip(words, slots, strict=True)
        if slot == WILDCARD
    ]


class LogTemplateTask:
    def __init__(self, name: str, cfg: LogTemplateTaskConfig) -> None:
        from drain3 import TemplateMiner
        from drain3.file_persistence import FilePersistence
        from drain3.template_miner_config import TemplateMinerConfig

        self.name = name
        mc = TemplateMinerConfig()
        mc.drain_sim_th = cfg.similarity
        mc.drain_depth = cfg.depth
        mc.drain_max_clusters = cfg.max_clusters
        mc.profiling_enabled = False
        mc.snapshot_interval_minutes = 1  # with a state file: at most a minute of learning is lost
        persistence = FilePersistence(str(cfg.state_file)) if cfg.state_file is not None else None
        self._miner = TemplateMiner(persistence_handler=persistence, config=mc)

    def process(self, notes: Sequence[Note]) -> list[dict[str, Any]]:
        out = []
        for note in notes:
            line = note.text.strip()
            if not line:
                out.append({"template": "", "template_id": template_id(""), "cluster": None, "parameters": []})
                continue
            r = self._miner.add_log_message(line)
            template = r["template_mined"]
            offset = note.text.find(line)  # spans are into the note as received, not the stripped line
            params = [{**p, "start": p["start"] + offset, "end": p["end"] + offset} for p in parameters(template, line)]
            out.append(
                {
                    "template": template,
                    "template_id": template_id(template),
                    "cluster": r["cluster_id"],
                    "parameters": params,
                }
            )
        return out

    def close(self) -> None:
        if self._miner.persistence_handler is not None:
            self._miner.save_state("shutdown")
