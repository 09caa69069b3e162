"""Prompt templates: the families, GGUF chat templates (jinja), selection, BOS handling."""

from __future__ import annotations

import pytest

from fila_cli.errors import ModelError
from fila_cli.llm import LlamaBackend
from fila_cli.llm.templates import (
    FAMILIES,
    VICUNA_SYSTEM,
    guess_family,
    select_template,
    template_from_chat_template,
)
from tests.helpers.tiny_llm import BOS_ID, build_tiny_llm, tiny_llm_tokens

QUESTION = "What is the total {amount}?"  # braces must survive rendering

# Shaped like the chat templates shipped in Qwen/ChatML and Mistral GGUFs.
CHATML_JINJA = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)


def test_vicuna_matches_llava_1_6():
    before, after = FAMILIES["vicuna"].render(QUESTION)
    assert before + "<image>" + after == f"{VICUNA_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"


def test_mistral_matches_llava_1_6():
    before, after = FAMILIES["mistral"].render(QUESTION)
    assert before + "<image>" + after == f"[INST] <image>\n{QUESTION} [/INST]"
    before, _ = FAMILIES["mistral"].render(QUESTION, system="Be brief.")
    assert before == "[INST] Be brief.\n\n"


def test_chatml_and_llama3():
    before, after = FAMILIES["chatml"].render(QUESTION, system="Answer.")
    assert before == "<|im_start|>system\nAnswer.<|im_end|>\n<|im_start|>user\n"
    assert after == f"\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    before, after = FAMILIES["llama3"].render(QUESTION, system="Answer.")
    assert before == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert after == f"\n{QUESTION}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_splits_around_the_image(family):
    template = FAMILIES[family]
    before, after = template.render(QUESTION)
    assert QUESTION in after and QUESTION not in before
    if template.default_system:
        assert template.default_system in before
    no_system, _ = template.render(QUESTION, system="")
    assert template.default_system is None or template.default_system not in no_system


def test_gguf_chat_template_splits_at_the_image():
    template = template_from_chat_template(CHATML_JINJA)
    before, after = template.render(QUESTION)
    assert before == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert after == f"\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    before, _ = template.render(QUESTION, system="Be brief.")
    assert before == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


def test_gguf_template_without_a_system_role_folds_the_system_prompt_in():
    template = template_from_chat_template(MISTRAL_JINJA, bos_token="<s>", eos_token="</s>")
    assert template.render(QUESTION) == ("<s>[INST] ", f"\n{QUESTION} [/INST]")
    assert template.render(QUESTION, system="Be brief.") == ("<s>[INST] Be brief.\n\n", f"\n{QUESTION} [/INST]")


def test_broken_gguf_template_is_an_error_and_selection_falls_back():
    with pytest.raises(ModelError):
        template_from_chat_template("{% for m in messages %}")  # not valid jinja
    with pytest.raises(ModelError):
        template_from_chat_template("{{ raise_exception('no') }}")
    with pytest.raises(ModelError, match="exactly once"):
        template_from_chat_template("no messages here")
    assert select_template(None, "{% for m in messages %}", "llava-v1.6-mistral-7b").name == "mistral"


def test_sandbox_blocks_unsafe_templates():
    with pytest.raises(ModelError, match="unsafe"):
        template_from_chat_template("{{ messages[0].content }}{{ ''.__class__.__mro__[1].__subclasses__() }}")


def test_selection_order():
    assert select_template("chatml", CHATML_JINJA, "llava-v1.6-mistral-7b").name == "chatml"  # bundle wins
    assert select_template(None, CHATML_JINJA, "llava-v1.6-mistral-7b").name == "gguf"  # then the GGUF
    assert select_template(None, None, "llava-v1.6-mistral-7b").name == "mistral"  # then the name
    assert select_template(None, None, "some-model").name == "vicuna"  # else vicuna
    with pytest.raises(ModelError, match="unknown prompt template 'alpaca'"):
        select_template("alpaca", None, "x")


@pytest.mark.parametrize(
    "name, family",
    [
        ("llava-v1.6-vicuna-7b", "vicuna"),
        ("llava-v1.6-mistral-7b", "mistral"),
        ("llava-v1.6-34b", "chatml"),
        ("Nous-Hermes-2-Yi-34B", "chatml"),
        ("Qwen2-7B-Instruct", "chatml"),
        ("llama3-llava-next-8b", "llama3"),
        ("Meta-Llama-3-8B-Instruct", "llama3"),
        ("tiny-llama", None),  # the name does not tell: select_template falls back to vicuna, and says so
    ],
)
def test_guess_family(name, family):
    assert guess_family(name) == family


def test_chat_template_from_a_gguf_drives_tokenisation(tmp_path):
    """The GGUF's own template is found, rendered and tokenised: markers are single special
    tokens, and the BOS the template writes is not doubled by the backend."""
    path = build_tiny_llm(tmp_path / "mistral-like.gguf", chat_template=MISTRAL_JINJA)
    tokens = tiny_llm_tokens()
    with LlamaBackend(path, n_ctx=128) as backend:
        template = select_template(
            None,
            backend.chat_template,
            backend.model_name,
            bos_token=backend.token_text(backend.bos),
            eos_token=backend.token_text(backend.eos),
        )
        assert template.name == "gguf"
        before, after = template.render("What is the total?")
        before_ids = backend.tokenize(before, at_start=True)
        after_ids = backend.tokenize(after)
        assert before_ids[:2] == [BOS_ID, tokens.index("[INST]")] and before_ids.count(BOS_ID) == 1
        assert after_ids[-1] == tokens.index("[/INST]")
        # With an empty bos_token the backend supplies the BOS itself: the same ids.
        plain = template_from_chat_template(MISTRAL_JINJA)
        assert backend.tokenize(plain.render("What is the total?")[0], at_start=True) == before_ids


# --- choosing the format: guesses said, --template honoured (through the CLI) ---------------------


def test_a_guess_is_marked_and_a_known_format_is_not():
    assert select_template(None, None, "some-model").guessed_because == (
        "fila's default, as its GGUF has no chat template and the model name 'some-model' does not tell")
    assert select_template(None, None, "llava-v1.6-mistral-7b").guessed_because == (
        "guessed from the model name 'llava-v1.6-mistral-7b': its GGUF has no chat template")
    assert select_template(None, "{% for m in messages %}", "m-mistral").guessed_because.endswith(
        "its GGUF's chat template cannot be used")
    for known in (select_template("chatml", None, "x"), select_template(None, CHATML_JINJA, "x"),
                  select_template(None, None, "some-model", user_choice="llama3")):
        assert known.guessed_because is None


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from tests.helpers.bad_documents import make_good_pdf

    return make_good_pdf(tmp_path_factory.mktemp("doc") / "one.pdf", ["Total: 12 EUR"])


WIDE = {"COLUMNS": "1000"}  # --help's table on one line an option


def fila(*args, stdin=None):
    from tests.helpers.run_fila import fila as run_fila

    return run_fila(*args, stdin=stdin, env=WIDE)


def invoke(*args):
    """fila in this process: for help texts and usage errors."""
    from tests.helpers.run_fila import invoke as run_in_process

    return run_in_process(*args, env=WIDE)


def prompt_tokens(bundle, template, question):
    """Text tokens of a one-page prompt in ``template``, tokenised as the backend does."""
    from tests.helpers.tiny_bundle import LLM_FILE

    before, after = template.render(question)
    with LlamaBackend(bundle / LLM_FILE, n_ctx=256) as backend:
        return len(backend.tokenize(before, at_start=True)) + len(backend.tokenize(after))


def test_an_llm_whose_format_fila_cannot_tell_is_prompted_as_vicuna_and_fila_says_so(bundle, page):
    completed = fila("ask", page, "Total?", "--model", bundle, "--max-tokens", "2", "--no-cache", "--json")
    assert completed.returncode == 0, completed.stderr
    said = " ".join(completed.stderr.split())
    assert ("prompt format: vicuna (fila's default, as its GGUF has no chat template and the model name 'tiny-llama' "
            "does not tell); choose one with --template (vicuna, mistral, chatml, llama3 or a FILE.jinja)") in said
    import json

    assert json.loads(completed.stdout)["tokens"]["prompt"] == prompt_tokens(bundle, FAMILIES["vicuna"], "Total?")


def test_template_chooses_the_prompt_format_by_name_or_jinja_file(bundle, page, tmp_path):
    import json

    from fila_cli.llm.templates import template_from_file

    by_name = fila("ask", page, "Total?", "--model", bundle, "--max-tokens", "2", "--no-cache", "--json",
                   "--template", "mistral")
    assert by_name.returncode == 0, by_name.stderr
    assert "prompt format" not in by_name.stderr  # chosen, not guessed: nothing to say
    assert json.loads(by_name.stdout)["tokens"]["prompt"] == prompt_tokens(bundle, FAMILIES["mistral"], "Total?")
    jinja = tmp_path / "short.jinja"
    jinja.write_text("{% for m in messages %}Q: {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} A:{% endif %}")
    by_file = fila("ask", page, "Total?", "--model", bundle, "--max-tokens", "2", "--no-cache", "--json",
                   "--template", jinja)
    assert by_file.returncode == 0, by_file.stderr
    expected = prompt_tokens(bundle, template_from_file(jinja), "Total?")
    assert json.loads(by_file.stdout)["tokens"]["prompt"] == expected != prompt_tokens(bundle, FAMILIES["mistral"], "Total?")


@pytest.mark.parametrize("command", ["ask", "chat", "batch", "eval"])
def test_every_command_that_prompts_an_llm_takes_template_and_lists_the_names(command, bundle, page, tmp_path):
    help_text = " ".join(invoke(command, "--help").stdout.split())
    assert "--template" in help_text and "vicuna, mistral, chatml, llama3" in help_text and "--ctx-size" in help_text
    args = {"ask": [page, "Total?"], "chat": [page], "batch": [page, "-q", "Total?"],
            "eval": ["--task", "docvqa", "--data", tmp_path]}[command]
    unknown = invoke(command, *args, "--model", bundle, "--template", "alpaca")
    assert unknown.returncode == 2 and "--template alpaca: not a known prompt format (vicuna, mistral, chatml, llama3)" \
        in " ".join(unknown.stderr.split())
    missing = invoke(command, *args, "--model", bundle, "--template", tmp_path / "none.jinja")
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr


def test_a_jinja_file_that_cannot_render_a_question_is_a_usage_error(bundle, page, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    completed = invoke("ask", page, "Total?", "--model", bundle, "--template", broken)
    assert completed.returncode == 2 and f"{broken} is not valid jinja" in " ".join(completed.stderr.split())
