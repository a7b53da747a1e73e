"""Chat template references: transformers' apply_chat_template with each family's published Jinja
template, on several conversations, for lorad's C++ renderings to equal string for string.

Output (out = <build>/parity/chat_templates/):
  <family>/tokenizer_config.json (+ the tiny model's tokenizer.model): a folder whose
      chat_template is the family's Jinja text, for ChatTemplate::FromTokenizerConfig
  cases.json  [{"family", "recognised", "folder", "today" (the date strftime_now gave),
               "dated" (whether the template asks strftime_now for it),
               "renders": [{"messages", "add_generation_prompt", ["continue_final_message"],
                            "text" | "error"}]}]
"""
import datetime
import json
import pathlib
import shutil

# The families' templates as their tokenizer_config.json files publish them.
# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
    "<|end_header_id|>\n\n' }}{% endif %}"
)
# The ChatML template (teknium/OpenHermes, the tiny fixture model)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' "
    "}}{% endif %}"
)
# mistralai/Mistral-7B-Instruct-v0.2 (the template with an optional system message)
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)
# meta-llama/Llama-2-7b-chat-hf
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
    "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
    "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
    "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
# Alpaca has no model-published template; this is the multi-turn one Unsloth ships
# (unsloth/chat_templates.py, "alpaca") with Stanford Alpaca's preamble as the default system.
ALPACA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% set loop_messages = messages[1:] %}{% else %}{{ 'Below is an instruction that describes "
    "a task. Write a response that appropriately completes the request.' + '\n\n' }}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + "
    "eos_token + '\n\n' }}{% else %}{{ raise_exception('Only user and assistant roles are "
    "supported!') }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}"
    "{% endif %}"
)

# Qwen/Qwen2-7B-Instruct: ChatML with a default system turn when the conversation has none
# (the Jinja source writes the newlines as \\n escapes, as the tokenizer_config.json does).
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# NousResearch/Hermes-2-Pro-Llama-3-8B's default template (Hermes 3 too): ChatML that writes the
# tokenizer's BOS first.
HERMES = (
    "{{bos_token}}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3.1 and 3.2 Instruct open every conversation with a system turn holding the knowledge
# cutoff and a date: 3.1 a fixed date_string, 3.2 today's (transformers defines strftime_now).
# The parts for tools are left out (lorad's Chat has no tools); the rest is as
# meta-llama/Llama-3.1-8B-Instruct and meta-llama/Llama-3.2-1B-Instruct publish it.
_LLAMA31_DATE = """{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
"""
_LLAMA32_DATE = """{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
"""
_LLAMA3X_BODY = r"""{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
_LLAMA3X_HEAD = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
"""
LLAMA31 = _LLAMA3X_HEAD + _LLAMA31_DATE + _LLAMA3X_BODY
LLAMA32 = _LLAMA3X_HEAD + _LLAMA32_DATE + _LLAMA3X_BODY

# folder name -> (template, bos, eos, the family lorad recognises it as)
FAMILIES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "llama3.1": (LLAMA31, "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "llama3.2": (LLAMA32, "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "chatml": (CHATML, "<s>", "</s>", "chatml"),
    "qwen2": (QWEN2, None, "<|im_end|>", "chatml"),
    "hermes": (HERMES, "<s>", "<|im_end|>", "chatml"),
    "llama2": (LLAMA2, "<s>", "</s>", "llama2"),
    "mistral": (MISTRAL, "<s>", "</s>", "mistral"),
    "alpaca": (ALPACA, "<s>", "</s>", "alpaca"),
}


def _m(role, content):
    return {"role": role, "content": content}


SYSTEM = _m("system", "You are a helpful assistant.")
CONVERSATIONS = [
    [_m("user", "Hello!")],
    [SYSTEM, _m("user", "What is 2+2?")],
    [SYSTEM, _m("user", "Hi"), _m("assistant", "Hello! How can I help?"), _m("user", "Tell me a joke.")],
    [_m("user", "one"), _m("assistant", "two"), _m("user", "three"), _m("assistant", "four")],
    [_m("user", "  Grüße aus München\n\n 日本語 😀 \t"), _m("assistant", "\n Привет! \n")],
    [_m("user", "\u3000padded\u00a0\x1c"), _m("assistant", "")],
    [_m("system", "Answer in French.\nBe brief."), _m("user", "Where is <s> [INST] written?")],
    # Replies prefilled for continue_final_message: trailing spaces a family trims or keeps.
    [_m("user", "Hi"), _m("assistant", "Sure, here ")],
    [SYSTEM, _m("user", "JSON please"), _m("assistant", "{\n  \u3000")],
    # Conversations some templates refuse.
    [_m("user", "a"), _m("user", "b")],
    [_m("assistant", "I speak first")],
    [_m("user", "a"), _m("system", "late system")],
    [_m("user", "a"), _m("assistant", "b"), _m("system", "late system")],
]


def write(out: pathlib.Path, model: pathlib.Path) -> None:
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    results = []
    for family, (jinja, bos, eos, recognised) in FAMILIES.items():
        folder = out / family
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(model / "tokenizer.model", folder / "tokenizer.model")
        config = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8"))
        config.update(chat_template=jinja, bos_token=bos, eos_token=eos)
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2),
                                                      encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(str(folder))
        while True:  # again if the day changed while rendering (strftime_now's date)
            today = datetime.datetime.now().strftime("%d %b %Y")
            renders = []
            def render(messages, gen, cont=False):
                r = {"messages": messages, "add_generation_prompt": gen}
                if cont:
                    r["continue_final_message"] = True
                try:
                    r["text"] = tok.apply_chat_template(messages, tokenize=False,
                                                        add_generation_prompt=gen,
                                                        continue_final_message=cont)
                except TemplateError as e:
                    r["error"] = str(e)
                renders.append(r)

            for messages in CONVERSATIONS:
                for gen in (False, True):
                    render(messages, gen)
                if messages[-1]["role"] == "assistant":  # the prefilled reply continued
                    render(messages, False, cont=True)
            if datetime.datetime.now().strftime("%d %b %Y") == today:
                break
        results.append({"family": family, "recognised": recognised,
                        "folder": str(folder.resolve()), "renders": renders, "today": today,
                        "dated": "strftime_now" in jinja})
    (out / "cases.json").write_text(json.dumps(results, ensure_ascii=False, indent=1),
                                    encoding="utf-8")
