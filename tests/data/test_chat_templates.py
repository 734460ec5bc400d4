"""Each family's chat template, read from a user-supplied `tokenizer_config.json`.

The templates below are written in the form each family's instruct models publish them (Llama 3,
Qwen2.5, Qwen3, Mistral 7B Instruct v0.1/v0.2, Gemma 2, Gemma 3; tool-calling branches left out
or shortened). Each test writes its template into a `tokenizer_config.json` in tmp_path, reads it
with `pofx.data.ChatTemplate.from_file`, and compares the rendered text with a hand-written
expected string, with and without the generation prompt, and with transformers' own renderer
(`render_jinja_template`) on the same template. It also checks what DPO needs of a template: the
prompt rendered with the generation prompt is a prefix of the prompt + completion rendering.
"""

import json

import jinja2
import pytest

from pofx import data

LLAMA3 = (
  "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
  "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
  "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3 = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

MISTRAL = (
  "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
  "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
  "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
  "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

GEMMA2 = (
  "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
  "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
  "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
  "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
  "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

SYSTEM = [{"role": "system", "content": "You are brief."}]
TURNS = [
  {"role": "user", "content": "Hi there"},
  {"role": "assistant", "content": "Hello!"},
  {"role": "user", "content": "Sky colour?"},
]
ANSWER = [{"role": "assistant", "content": "Blue."}]

# family: (template, special tokens, with a system turn, expected rendering of the prompt,
#          the generation prompt, expected rendering of prompt + ANSWER after the prompt)
FAMILIES = {
  "llama3": (
    LLAMA3,
    {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    True,
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nSky colour?<|eot_id|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>",
  ),
  "qwen2.5": (
    QWEN25,
    {"bos_token": None, "eos_token": "<|im_end|>"},
    False,
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\nSky colour?<|im_end|>\n",
    "<|im_start|>assistant\n",
    "<|im_start|>assistant\nBlue.<|im_end|>\n",
  ),
  "qwen3": (
    QWEN3,
    {"bos_token": None, "eos_token": "<|im_end|>"},
    True,
    "<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nSky colour?<|im_end|>\n",
    "<|im_start|>assistant\n",
    # the last answer after the last user turn carries an (empty) thinking block
    "<|im_start|>assistant\n<think>\n\n</think>\n\nBlue.<|im_end|>\n",
  ),
  "mistral": (
    MISTRAL,
    {"bos_token": "<s>", "eos_token": "</s>"},
    False,
    "<s>[INST] Hi there [/INST]Hello!</s>[INST] Sky colour? [/INST]",
    "",
    "Blue.</s>",
  ),
  "gemma2": (
    GEMMA2,
    {"bos_token": "<bos>", "eos_token": "<eos>"},
    False,
    "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\nSky colour?<end_of_turn>\n",
    "<start_of_turn>model\n",
    "<start_of_turn>model\nBlue.<end_of_turn>\n",
  ),
  "gemma3": (
    GEMMA3,
    {"bos_token": "<bos>", "eos_token": "<eos>"},
    True,
    "<bos><start_of_turn>user\nYou are brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\nSky colour?<end_of_turn>\n",
    "<start_of_turn>model\n",
    "<start_of_turn>model\nBlue.<end_of_turn>\n",
  ),
}


def _write(tmp_path, template, specials):
  path = tmp_path / "tokenizer_config.json"
  path.write_text(json.dumps({"chat_template": template, **specials}), encoding="utf-8")
  return data.ChatTemplate.from_file(str(path))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_template_renders_hand_written_text(family, tmp_path):
  template, specials, system, prompt_text, generation, answer_text = FAMILIES[family]
  chat = _write(tmp_path, template, specials)
  prompt = (SYSTEM if system else []) + TURNS
  assert chat.render(prompt) == prompt_text
  assert chat.render(prompt, add_generation_prompt=True) == prompt_text + generation
  full = chat.render(prompt + ANSWER)
  assert full == prompt_text + answer_text
  # DPO's split: the prompt with the generation prompt is a prefix of prompt + completion.
  assert full.startswith(chat.render(prompt, add_generation_prompt=True))

  transformers = pytest.importorskip("transformers")
  from transformers.utils.chat_template_utils import render_jinja_template

  for conversation, gen in ((prompt, False), (prompt, True), (prompt + ANSWER, False)):
    (theirs,), _ = render_jinja_template(
      conversations=[conversation], chat_template=template, add_generation_prompt=gen, **specials
    )
    assert chat.render(conversation, add_generation_prompt=gen) == theirs
  assert transformers  # imported for the renderer above


def test_template_variables_and_family_refusals(tmp_path):
  qwen3 = _write(tmp_path, QWEN3, {"eos_token": "<|im_end|>"})
  assert qwen3.render(TURNS, add_generation_prompt=True, enable_thinking=False).endswith(
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
  )
  gemma2 = _write(tmp_path, GEMMA2, {"bos_token": "<bos>"})
  with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
    gemma2.render(SYSTEM + TURNS)
  mistral = _write(tmp_path, MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"})
  with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
    mistral.render(TURNS[:1] + TURNS[:1])
  # tools is defined (None) when not given, as in transformers: `tools is not none` is False.
  probe = _write(tmp_path, "{{ 'T' if tools is not none else 'N' }}{{ 'D' if documents is defined else '' }}", {})
  assert probe.render(TURNS) == "ND"
  named = tmp_path / "named.json"
  named.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}]}))
  with pytest.raises(ValueError, match=r"lists \['tool_use'\] but no 'default'"):
    data.ChatTemplate.from_file(str(named))
  empty = tmp_path / "empty.json"
  empty.write_text(json.dumps({"eos_token": "</s>"}))
  with pytest.raises(ValueError, match="no chat_template"):
    data.ChatTemplate.from_file(str(empty))
