"""What every exporter family shares: where a checkpoint keeps its chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def find_chat_template(tokenizer: Any, model_dir: str | Path | None) -> str | None:
    """The chat template: the tokenizer's, else `chat_template.jinja` / `chat_template.json` in `model_dir`."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        return template
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = Path(model_dir) / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
    return None
