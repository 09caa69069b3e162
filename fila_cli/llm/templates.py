"""Prompt templates: the text that goes before and after the image.

A LLaVA prompt is one user turn whose content is ``<image>\\n{question}``; the visual tokens take
the place of ``<image>``. ``PromptTemplate.render`` returns the two texts around it, ready for
``LlamaBackend.generate([before, visual_tokens, after], ...)``.

Families (as LLaVA-1.6 / LLaVA-NeXT's conversation templates):

- ``vicuna``  LLaVA-1.6 Vicuna: ``{system} USER: <image>\\n{q} ASSISTANT:``
- ``mistral`` LLaVA-1.6 Mistral: ``[INST] <image>\\n{q} [/INST]``
- ``chatml``  Yi-34B / Qwen: ``<|im_start|>user\\n<image>\\n{q}<|im_end|>\\n<|im_start|>assistant\\n``
- ``llama3``  LLaVA-NeXT Llama-3: ``<|start_header_id|>user<|end_header_id|>\\n\\n<image>\\n{q}<|eot_id|>...``

or the GGUF's own ``tokenizer.chat_template`` (jinja), rendered in a sandbox as transformers
does, with a unique placeholder where the image goes. BOS: the family texts carry no BOS except
llama3's ``<|begin_of_text|>``; the backend adds the model's BOS only when the text does not
already start with it, so it is never doubled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fila_cli.errors import ModelError, UsageError

log = logging.getLogger(__name__)

SYSTEM_SLOT = "{system}"
QUESTION_SLOT = "{question}"
EOS_SLOT = "{eos}"  # the model's end-of-sequence text, in follow-up turns
GGUF_TEMPLATE_NAME = "gguf"
TEMPLATE_FILE_SUFFIX = ".jinja"
DEFAULT_FAMILY = "vicuna"
# A question used once to check that a GGUF chat template renders at all.
PROBE_QUESTION = "What is shown?"

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CHATML_SYSTEM = "Answer the questions."  # LLaVA-NeXT-34B's conv_chatml_direct
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)


@dataclass(frozen=True)
class PromptTemplate:
    """Texts around the image for one user question.

    Family templates fill ``{system}`` in ``before_image`` with ``system_format`` (or nothing when
    the system prompt is empty) and ``{question}`` in ``after_image``. A template made from a GGUF
    chat template (``chat_template`` set) renders that jinja source instead.
    """

    name: str
    before_image: str = ""
    after_image: str = ""
    system_format: str = SYSTEM_SLOT
    default_system: str | None = None
    chat_template: str | None = None  # jinja source from the GGUF
    bos_token: str = ""
    eos_token: str = ""
    # A later question of a conversation: the text from the end of the previous answer (its
    # end-of-turn marker, which generation stops at without decoding) to the next answer.
    follow_up: str = ""
    # Where a jinja chat template came from, for messages ("the GGUF's chat template", a file).
    origin: str = "the GGUF's chat template"
    # Why this format was guessed (for the user); None when the model or the user named it.
    guessed_because: str | None = None

    def render(self, question: str, system: str | None = None) -> tuple[str, str]:
        """(text before the image, text after the image). ``system`` None = the default."""
        system = self.default_system if system is None else system
        if self.chat_template is not None:
            return _render_chat_template(self, question, system)
        # str.replace, not str.format: questions may hold braces.
        system_text = self.system_format.replace(SYSTEM_SLOT, system) if system else ""
        return (
            self.before_image.replace(SYSTEM_SLOT, system_text),
            self.after_image.replace(QUESTION_SLOT, question),
        )

    def render_follow_up(self, question: str, eos_text: str) -> str:
        """The text that closes the previous answer and asks ``question`` (``fila chat``'s later
        turns). ``eos_text``: the model's end-of-sequence token as text, e.g. "</s>"."""
        if self.chat_template is not None:
            return _render_follow_up(self, question, eos_text)
        return self.follow_up.replace(EOS_SLOT, eos_text).replace(QUESTION_SLOT, question)


FAMILIES: dict[str, PromptTemplate] = {
    "vicuna": PromptTemplate(
        name="vicuna",
        before_image="{system}USER: ",
        after_image="\n{question} ASSISTANT:",
        system_format="{system} ",
        default_system=VICUNA_SYSTEM,
        follow_up="{eos}USER: {question} ASSISTANT:",  # LLaVA conv_vicuna_v1: sep2 "</s>" after each answer
    ),
    "mistral": PromptTemplate(
        name="mistral",
        # Mistral has no system role: a system prompt opens the user turn.
        before_image="[INST] {system}",
        after_image="\n{question} [/INST]",
        system_format="{system}\n\n",
        default_system=None,
        follow_up="{eos}[INST] {question} [/INST]",
    ),
    "chatml": PromptTemplate(
        name="chatml",
        before_image="{system}<|im_start|>user\n",
        after_image="\n{question}<|im_end|>\n<|im_start|>assistant\n",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        default_system=CHATML_SYSTEM,
        follow_up="<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
    ),
    "llama3": PromptTemplate(
        name="llama3",
        before_image="<|begin_of_text|>{system}<|start_header_id|>user<|end_header_id|>\n\n",
        after_image="\n{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        default_system=LLAMA3_SYSTEM,
        follow_up="<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
}

# Model-name fragments -> family, checked in order (lower-cased name).
NAME_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("llama-3", "llama3", "llama_3"), "llama3"),
    (("mistral", "mixtral"), "mistral"),
    (("qwen", "yi-", "34b", "hermes", "chatml"), "chatml"),
    (("vicuna",), "vicuna"),
)


# --- GGUF chat templates (jinja) -----------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # jinja's own tojson HTML-escapes; chat templates expect plain JSON (as transformers).
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The sandbox transformers renders chat templates in (same options and helpers)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _render_chat_template(template: PromptTemplate, question: str, system: str | None) -> tuple[str, str]:
    placeholder = f"<fila-image-{uuid.uuid4().hex}>"  # unique: cannot occur in the template or question
    user = {"role": "user", "content": f"{placeholder}\n{question}"}
    compiled = _jinja_env().from_string(template.chat_template or "")

    def render(messages: list[dict[str, str]]) -> str:
        return compiled.render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=template.bos_token,
            eos_token=template.eos_token,
        )

    try:
        if system:
            try:
                text = render([{"role": "system", "content": system}, user])
            except TemplateError:
                # Templates without a system role (e.g. Mistral's) reject it: open the turn with it.
                text = render([{**user, "content": f"{system}\n\n{user['content']}"}])
        else:
            text = render([user])
    except TemplateError as e:
        raise ModelError(f"{template.origin} cannot render a question: {e}") from e
    if text.count(placeholder) != 1:
        raise ModelError(f"{template.origin} does not place the user's message exactly once")
    before, after = text.split(placeholder)
    return before, after


def _render_follow_up(template: PromptTemplate, question: str, eos_text: str) -> str:
    """What the GGUF's template puts between an answer and the next answer: rendered with a
    marker as the answer, everything after the marker."""
    answer = f"<fila-answer-{uuid.uuid4().hex}>"
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": answer},
                {"role": "user", "content": question}]
    try:
        text = _jinja_env().from_string(template.chat_template or "").render(
            messages=messages, add_generation_prompt=True, bos_token=template.bos_token,
            eos_token=template.eos_token or eos_text)
    except TemplateError as e:
        raise ModelError(f"{template.origin} cannot render a conversation: {e}") from e
    if text.count(answer) != 1:
        raise ModelError(f"{template.origin} does not place an answer exactly once in a conversation")
    return text.split(answer)[1]


def template_from_chat_template(chat_template: str, *, bos_token: str = "", eos_token: str = "",
                                origin: str = "the GGUF's chat template",
                                name: str = GGUF_TEMPLATE_NAME) -> PromptTemplate:
    """A PromptTemplate from a GGUF ``tokenizer.chat_template`` (or a jinja file: ``origin`` names
    it in messages); ModelError if it cannot render.

    bos_token/eos_token: the texts the template may insert (``{{ bos_token }}``); with "" the
    backend still adds the model's BOS when the model asks for one.
    """
    try:
        _jinja_env().from_string(chat_template)
    except TemplateError as e:
        raise ModelError(f"{origin} is not valid jinja: {e}") from e
    template = PromptTemplate(name=name, chat_template=chat_template, bos_token=bos_token, eos_token=eos_token,
                              origin=origin)
    template.render(PROBE_QUESTION)  # fail now, not at the first question
    return template


def guess_family(model_name: str) -> str | None:
    """Family from a model name ("llava-v1.6-mistral-7b" -> "mistral"); None when the name does not tell."""
    lowered = model_name.lower()
    for fragments, family in NAME_HINTS:
        if any(fragment in lowered for fragment in fragments):
            return family
    return None


def is_template_file(choice: str) -> bool:
    """Whether a ``--template`` value names a jinja file rather than a family."""
    return choice.endswith(TEMPLATE_FILE_SUFFIX) or "/" in choice or os.sep in choice


def check_template_choice(choice: str) -> None:
    """UsageError unless ``choice`` is a known family or an existing .jinja file (before any model loads)."""
    if choice in FAMILIES:
        return
    if not is_template_file(choice):
        raise UsageError(f"--template {choice}: not a known prompt format ({', '.join(FAMILIES)}) "
                         f"nor a {TEMPLATE_FILE_SUFFIX} file")
    if not Path(choice).is_file():
        raise UsageError(f"--template {choice}: no such file; pass a jinja chat template, or one of "
                         f"{', '.join(FAMILIES)}")


def template_from_file(path: str | os.PathLike) -> PromptTemplate:
    """A PromptTemplate from a jinja chat template file (as a GGUF's ``tokenizer.chat_template``)."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read the chat template ({e}); pass a UTF-8 jinja file") from e
    try:
        return template_from_chat_template(source, origin=str(path), name=path.name)
    except ModelError as e:
        raise UsageError(f"{e}; fix the template, or pass one of {', '.join(FAMILIES)}") from e


def select_template(
    name: str | None,
    gguf_chat_template: str | None,
    model_name: str,
    *,
    bos_token: str = "",
    eos_token: str = "",
    user_choice: str | None = None,
) -> PromptTemplate:
    """The user's choice (``--template``: a family or a jinja file), else the bundle's own template
    name, else the GGUF's chat template (when it renders), else the family guessed from the model
    name, else vicuna. A guess carries ``guessed_because`` for the user."""
    if user_choice:
        check_template_choice(user_choice)
        return FAMILIES[user_choice] if user_choice in FAMILIES else template_from_file(user_choice)
    if name:
        if name not in FAMILIES:
            raise ModelError(f"unknown prompt template '{name}'; known: {', '.join(sorted(FAMILIES))}")
        return FAMILIES[name]
    why_not_gguf = "its GGUF has no chat template"
    if gguf_chat_template:
        try:
            return template_from_chat_template(gguf_chat_template, bos_token=bos_token, eos_token=eos_token)
        except ModelError as e:
            log.warning("%s; guessing the prompt format from the model name '%s'", e, model_name)
            why_not_gguf = "its GGUF's chat template cannot be used"
    family = guess_family(model_name)
    if family is not None:
        because = f"guessed from the model name '{model_name}': {why_not_gguf}"
    else:
        family = DEFAULT_FAMILY
        because = f"fila's default, as {why_not_gguf} and the model name '{model_name}' does not tell"
    return dataclasses.replace(FAMILIES[family], guessed_because=because)


def template_note(template: PromptTemplate) -> str | None:
    """One line for the user when the prompt format was guessed, else None."""
    if template.guessed_because is None:
        return None
    return (f"prompt format: {template.name} ({template.guessed_because}); "
            f"choose one with --template ({', '.join(FAMILIES)} or a FILE{TEMPLATE_FILE_SUFFIX})")
