"""Chat templates rendered with jinja2 the way transformers renders them, so a model's own template gives
byte-identical prompts."""

import json
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from exlcore.errors import ExlError


def _raise(message):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


ENV = _environment()


def render(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    try:
        return ENV.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **variables)
    except jinja2.TemplateError as e:
        raise ExlError(f"chat template: {e}") from None
