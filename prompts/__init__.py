"""The planner LLM's prompts as Markdown templates, read with importlib.resources."""

from __future__ import annotations

from importlib import resources
from string import Template


def load_prompt(name: str, **values: str) -> str:
    """Read `prompts/<name>.md` and fill its `$placeholders` from `values`.

    Raises KeyError naming the placeholder when a value is missing.
    """
    text = resources.files(__package__).joinpath(f"{name}.md").read_text(encoding="utf-8")
    return Template(text).substitute(values)
