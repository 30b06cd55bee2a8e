"""Drives epp-sim with the official `openai` client, unchanged: a completion, a streamed chat
completion with usage, and a model listing. Usage: openai_client.py BASE_URL. Prints OK."""
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")

models = client.models.list()
assert [m.id for m in models.data] == ["model"], models

prompt = "You are a helpful assistant. " * 40
first = client.completions.create(model="model", prompt=prompt, max_tokens=3)
assert first.choices[0].text, first
assert first.usage.completion_tokens == 3, first.usage
again = client.completions.create(model="model", prompt=prompt, max_tokens=3)
assert again.choices[0].text == first.choices[0].text, (again, first)
assert again.usage.prompt_tokens_details.cached_tokens > 0, again.usage

stream = client.chat.completions.create(
    model="model",
    messages=[{"role": "user", "content": "hi"}],
    max_tokens=4,
    stream=True,
    stream_options={"include_usage": True},
)
text, usage = "", None
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage:
        usage = chunk.usage
assert text, text
assert usage is not None and usage.completion_tokens == 4, usage

try:
    client.completions.create(model="missing", prompt="x")
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError:
    pass
print("OK")
