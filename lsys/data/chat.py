"""Chat templates: a conversation to the pieces of its training text, each marked answer or not.

A template turns a list of `{role, content}` turns into pieces: text, or a token id, and whether
the piece carries loss (is answer). Each piece is tokenized on its own, so piece boundaries are
token boundaries and the loss mask needs no character offsets. Turns after the last assistant
turn carry no loss and nothing follows them, so they are left out.

The plain template (`PlainTemplate`; the byte tokenizer, and any tokenizer without its own):
a system or user turn is the text `<|{role}|>\\n{content}\\n`; an assistant turn is the prompt
text `<|assistant|>\\n` (no loss), then `{content}` and the tokenizer's EOS id (both loss)::

    <|system|>\\nBe brief.\\n<|user|>\\nHi\\n<|assistant|>\\n[Hello!][EOS]<|user|>\\n...   ([...]: loss)

A Jinja template (`JinjaTemplate`) is written in the Hugging Face chat-template language
(variables `messages`, `add_generation_prompt`, `eos_token`, `bos_token`; `raise_exception`)
and rendered in a sandbox as `transformers` does. For assistant turn i the text before the answer
is render(messages[:i], add_generation_prompt=True) and the text through it render(messages[:i+1]);
the characters between are the answer, end-of-turn marker included. That needs every render to be
a prefix of the next, which holds for templates that render each turn on its own.

`load_chat_template` picks one: `data.chat_template`, else the `chat_template` of a
`tokenizer_config.json` beside the tokenizer's JSON file, else the plain template.
"""

import json
from pathlib import Path
from typing import Any, NoReturn, Protocol

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lsys.data.errors import DataError

# A piece of an example: text to tokenize or a token id, and whether it carries loss.
Piece = tuple[str | int, bool]
ROLES = ("system", "user", "assistant")


class ChatTemplate(Protocol):
    """What turns a checked conversation (roles in ROLES, string contents) into pieces."""

    name: str

    def pieces(self, messages: list[dict[str, str]]) -> list[Piece]:
        """The conversation through its last assistant turn; raises DataError (no example named) if it cannot."""


class PlainTemplate:
    """The fallback template of the module docstring; needs only the tokenizer's EOS id."""

    name = "plain"

    def __init__(self, eos_id: int):
        self.eos_id = eos_id

    def pieces(self, messages: list[dict[str, str]]) -> list[Piece]:
        """Prompt text for system/user turns, then `<|assistant|>\\n` + answer content + EOS per assistant turn."""
        pieces: list[Piece] = []
        for turn in messages[: _last_assistant(messages) + 1]:
            if turn["role"] == "assistant":
                pieces += [("<|assistant|>\n", False), (turn["content"], True), (self.eos_id, True)]
            else:
                pieces.append((f"<|{turn['role']}|>\n{turn['content']}\n", False))
        return pieces


class JinjaTemplate:
    """A Hugging Face chat template, rendered in jinja2's immutable sandbox; answers found by prefix renders."""

    def __init__(self, source: str, *, name: str, eos_token: str | None, bos_token: str = ""):
        self.source = source
        self.name = name
        self.eos_token = eos_token  # None: the tokenizer has no EOS text (byte tokenizer)
        self.bos_token = bos_token
        self._template = _compile(source, name)  # now, so a bad template fails before any data is read
        if eos_token is None and "eos_token" in jinja2.meta.find_undeclared_variables(_environment().parse(source)):
            raise DataError(
                f"chat template '{name}' writes eos_token, but the tokenizer has no EOS text; "
                "use an HF tokenizer (tokenizer.kind=hf) or a template without eos_token"
            )

    def __getstate__(self) -> dict[str, Any]:
        # `datasets` hashes and pickles the map function's arguments: the source, not the compiled code.
        return {key: value for key, value in self.__dict__.items() if key != "_template"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._template = _compile(self.source, self.name)

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        """The template's text for these turns."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                eos_token=self.eos_token or "",
                bos_token=self.bos_token,
            )
        except Exception as error:  # a template is code from the data's side: any failure is a data error
            raise DataError(f"chat template '{self.name}' failed: {_one_line(error)}") from None

    def pieces(self, messages: list[dict[str, str]]) -> list[Piece]:
        """Prompt and answer spans of the rendered conversation, through its last assistant turn."""
        pieces: list[Piece] = []
        done = ""  # the text already split into pieces
        for i, turn in enumerate(messages[: _last_assistant(messages) + 1]):
            if turn["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not through.startswith(prompt):
                raise DataError(
                    f"chat template '{self.name}' is not incremental at assistant turn {i}: a render of the turns "
                    "before it is not a prefix of the render through it, so its answer cannot be located"
                )
            if not through[len(prompt) :]:
                raise DataError(f"chat template '{self.name}' renders nothing for assistant turn {i}")
            if len(prompt) > len(done):
                pieces.append((prompt[len(done) :], False))
            pieces.append((through[len(prompt) :], True))
            done = through
        return pieces


def load_chat_template(
    path: str | None, *, tokenizer_path: str | None, eos_id: int, eos_token: str | None
) -> ChatTemplate:
    """The template to render examples with: the file `path`, else the tokenizer's own, else the plain one.

    `tokenizer_path`: the tokenizer's JSON file (None for the byte tokenizer); a `tokenizer_config.json`
    beside it gives the tokenizer's template and `bos_token`. `eos_token`: the EOS text (None: no text).
    """
    config_file = None if tokenizer_path is None else Path(tokenizer_path).expanduser().parent / "tokenizer_config.json"
    config = _tokenizer_config(config_file)
    bos_token = _token_text(config.get("bos_token")) or ""
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise DataError(f"data.chat_template '{path}' does not exist")
        return JinjaTemplate(file.read_text(encoding="utf-8"), name=path, eos_token=eos_token, bos_token=bos_token)
    source = config.get("chat_template")
    if source is None:
        return PlainTemplate(eos_id)
    name = str(config_file)
    if isinstance(source, list):  # several named templates: the default one is for plain chat
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(source, str):
        raise DataError(f"'{name}' has no usable chat_template (a string, or a list holding one named 'default')")
    return JinjaTemplate(source, name=name, eos_token=eos_token, bos_token=bos_token)


def _environment() -> ImmutableSandboxedEnvironment:
    # The settings `transformers` renders chat templates with.
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.globals["raise_exception"] = _raise_exception
    return environment


def _compile(source: str, name: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as error:
        raise DataError(f"chat template '{name}' does not compile: {_one_line(error)}") from None


def _tokenizer_config(file: Path | None) -> dict[str, Any]:
    if file is None or not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"'{file}' is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise DataError(f"'{file}' must hold a JSON object, got {type(config).__name__}")
    return config


def _token_text(token: Any) -> str | None:
    # tokenizer_config.json writes a special token as its text or as an AddedToken object.
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _last_assistant(messages: list[dict[str, str]]) -> int:
    return max((i for i, turn in enumerate(messages) if turn["role"] == "assistant"), default=-1)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
