"""The official `openai` client against `lntune serve` (tests/serve.rs): lists the models
and asks one question with an image, once whole and once streamed; prints JSON."""

import argparse
import base64
import json

from openai import OpenAI


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    a = ap.parse_args()
    client = OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key=a.api_key, max_retries=0)
    with open(a.image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": a.prompt},
        {"type": "image_url", "image_url": {"url": url}},
    ]}]
    whole = client.chat.completions.create(
        model=a.model, messages=messages, temperature=0, max_tokens=a.max_tokens)
    pieces, finish = [], None
    for chunk in client.chat.completions.create(
            model=a.model, messages=messages, temperature=0, max_tokens=a.max_tokens,
            stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    print(json.dumps({
        "models": [m.id for m in client.models.list().data],
        "text": whole.choices[0].message.content,
        "finish": whole.choices[0].finish_reason,
        "usage": whole.usage.completion_tokens,
        "streamed": "".join(pieces),
        "stream_finish": finish,
    }))


if __name__ == "__main__":
    main()
