"""Chat template tests. Oracle: transformers' apply_chat_template on the same GGUF, and its Jinja
renderer for templates that are not in a model."""

from __future__ import annotations

import gguf
import pytest
from oracle import hf_tokenizer

from llmcli.template import CHATML, ChatTemplate, TemplateError
from llmcli.tokenizer import Tokenizer
from quant.errors import LlmError
from quant.gguf_file import read_gguf

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And <b>3+3</b> & \"quotes\" 🤗?"},
]


@pytest.fixture()
def no_template_gguf(tmp_path):
    """A GGUF whose metadata has no tokenizer.chat_template."""
    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_gguf(tmp_path / "bare.gguf")


def render_like_transformers(source: str, messages: list[dict], **kwargs) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=source, **kwargs)
    return rendered[0]


@pytest.mark.slow
def test_model_template_matches_transformers(smollm2_path, smollm2_gguf):
    hf = hf_tokenizer(smollm2_path)
    template = ChatTemplate.from_gguf(smollm2_gguf, bos_token=hf.bos_token, eos_token=hf.eos_token)
    assert (template.origin, template.is_fallback) == ("model", False)
    assert template.source == smollm2_gguf.metadata["tokenizer.chat_template"]
    for messages in (CONVERSATION, CONVERSATION[1:]):  # without a system turn the template adds its own
        for add in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert template.render(messages, add_generation_prompt=add) == expected
    assert template.render(CONVERSATION).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # The prompt ids the engine feeds (render, then encode with no BOS added) equal transformers' own.
    tok = Tokenizer.from_gguf(smollm2_gguf)
    ids = tok.encode(template.render(CONVERSATION), add_special=False)
    assert ids == hf.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]


def test_fallback_is_chatml(no_template_gguf):
    template = ChatTemplate.from_gguf(no_template_gguf)
    assert (template.origin, template.is_fallback, template.source) == ("fallback (ChatML)", True, CHATML)
    assert template.render(CONVERSATION[:2]) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert template.render(CONVERSATION[:2], add_generation_prompt=False).endswith("2+2?<|im_end|>\n")


def test_override_file_wins_over_the_model(tmp_path, smollm2_gguf):
    path = tmp_path / "llama2.jinja"
    path.write_text("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}\n"
                    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    template = ChatTemplate.from_gguf(smollm2_gguf, override=path, bos_token="<s>", eos_token="</s>")
    assert (template.origin, template.is_fallback) == (f"file {path}", False)
    assert template.render(CONVERSATION[1:3]) == "<s>[user] What is 2+2?</s>\n[assistant] 4.</s>\n[assistant]"


def test_transformers_environment(no_template_gguf, tmp_path):
    # tojson without HTML escaping, trim_blocks / lstrip_blocks, loop controls, {% generation %},
    # strftime_now, and a token the caller did not give staying undefined: each as transformers renders it.
    source = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'assistant' %}{% continue %}{% endif %}\n"
        "    {% generation %}{{ m | tojson }}{% endgeneration %}\n"
        "{% endfor %}\n"
        "{{ messages[-1].content | tojson(indent=2) }}|{{ strftime_now('%Y') | length }}"
        "|{{ bos_token is defined }}|{{ eos_token }}\n"
    )
    path = tmp_path / "env.jinja"
    path.write_text(source)
    template = ChatTemplate.from_gguf(no_template_gguf, override=path, eos_token="</s>")
    expected = render_like_transformers(source, CONVERSATION, add_generation_prompt=True, eos_token="</s>")
    assert template.render(CONVERSATION) == expected
    assert '<b>3+3</b> & \\"quotes\\" 🤗?"' in expected and "assistant" not in expected
    assert "\n\n" not in expected and expected.endswith("|4|False|</s>")


def test_raise_exception_becomes_one_clean_error(tmp_path, no_template_gguf):
    path = tmp_path / "strict.jinja"
    path.write_text("{% if messages[0].role != 'user' %}"
                    "{{ raise_exception('Conversation must start with a user message') }}{% endif %}ok")
    template = ChatTemplate.from_gguf(no_template_gguf, override=path)
    assert template.render(CONVERSATION[1:]) == "ok"
    with pytest.raises(LlmError) as err:
        template.render(CONVERSATION)
    assert str(err.value) == ("chat template failed: Conversation must start with a user message "
                              f"(template: file {path})")


def test_bad_templates_give_clean_errors(tmp_path, no_template_gguf):
    with pytest.raises(TemplateError, match=r"template file .*missing\.jinja: no such file"):
        ChatTemplate.from_gguf(no_template_gguf, override=tmp_path / "missing.jinja")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")
    lazy = ChatTemplate.from_gguf(no_template_gguf, override=broken)  # compiled on first use
    with pytest.raises(TemplateError, match=r"^chat template failed: does not parse: line 1: .*endfor"):
        lazy.render(CONVERSATION)
    failing = tmp_path / "failing.jinja"
    failing.write_text("{{ messages[0].content + 1 }}")
    with pytest.raises(TemplateError, match="failed: TypeError"):
        ChatTemplate.from_gguf(no_template_gguf, override=failing).render(CONVERSATION)
    unsafe = tmp_path / "unsafe.jinja"
    unsafe.write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateError, match="failed"):
        ChatTemplate.from_gguf(no_template_gguf, override=unsafe).render(CONVERSATION)
