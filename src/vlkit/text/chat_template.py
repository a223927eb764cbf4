"""Chat templates: the jinja program a chat model ships to turn a list of messages into its prompt.

Templates come from model folders, so they are untrusted code: they run in jinja's immutable
sandbox, with the same globals, filters and whitespace rules transformers gives them
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``tojson``, ``strftime_now``,
``namespace``, loop controls and the ``{% generation %}`` tag), so a template renders here
exactly as it does there.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vlkit.errors import VlkitError

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
"""Where a folder's template may live, first found wins (transformers 5 writes the ``.jinja`` file)."""


class ChatTemplateError(VlkitError):
    """A template refused the conversation (``raise_exception``) or failed while rendering."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` marks the assistant's text for training masks;
    rendering keeps its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, so a template cannot reach Python internals."""

    def __init__(*args, **kwargs):  # noqa: N805 - jinja's Namespace takes self positionally too
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r} on a namespace")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """JSON without jinja's HTML escaping (templates write tool schemas into the prompt)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=dict, namespace=_Namespace)
    return env


def _plain(value):
    """Messages rebuilt from JSON types only (keys whose value is None dropped, as transformers
    does), so the sandboxed template never sees a caller's rich objects."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """A compiled template and the file it came from (named in every error)."""

    def __init__(self, source: str, origin: str):
        self.source = source
        self.origin = origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise VlkitError(f"{origin}: chat_template is not valid jinja (line {err.lineno}: {err.message})") from None

    def render(self, messages: list[dict], *, add_generation_prompt: bool, special_tokens: dict[str, str],
               tools: list[dict] | None = None, documents: list[dict] | None = None, **variables) -> str:
        """The prompt text for ``messages``; ``special_tokens`` (``bos_token``, ``eos_token``, ...) are
        template variables, and ``variables`` override them."""
        _check_messages(messages)
        context = {**special_tokens, **_plain(variables)}
        try:
            return self._template.render(messages=_plain(messages), add_generation_prompt=add_generation_prompt,
                                         tools=_plain(tools), documents=_plain(documents), **context)
        except jinja2.exceptions.TemplateError as err:
            raise ChatTemplateError(f"{self.origin}: the chat template refused the conversation: {err}") from None

    @classmethod
    def from_folder(cls, folder: Path, tokenizer_config: dict) -> "ChatTemplate | None":
        """The folder's default template, or None when it has none."""
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"), str(jinja_file))
        json_file = folder / "chat_template.json"
        if json_file.is_file():
            try:
                data = json.loads(json_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise VlkitError(f"{json_file}: malformed JSON ({err})") from None
            if not isinstance(data, dict) or not isinstance(data.get("chat_template"), str):
                raise VlkitError(f"{json_file}: expected an object with a string 'chat_template'")
            return cls(data["chat_template"], str(json_file))
        value = tokenizer_config.get("chat_template")
        origin = str(folder / "tokenizer_config.json")
        if value is None:
            return None
        return cls(_default_of(value, origin), origin)


def _default_of(value, origin: str) -> str:
    """A template string, or the ``default`` one of a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise VlkitError(f"{origin}: chat_template lists templates {sorted(map(str, named))} but none named 'default'")
    raise VlkitError(f"{origin}: chat_template must be a string or a list of named templates, got {type(value).__name__}")


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise VlkitError(f"a chat needs a non-empty list of messages, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise VlkitError(f"message {i} must be a mapping with a 'role' (and usually 'content'), got {m!r}")
