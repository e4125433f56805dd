#!/usr/bin/env python3
"""Drive a running `wgllm serve` with the official `openai` Python client.

Run by tests/serve.rs (which starts the server and makes a venv with
`pip install openai`); by hand:

    python tools/serve_client_check.py --base-url http://127.0.0.1:8080/v1 \
        --model my-model [--api-key KEY] [--expect-greedy PROMPT TEXT]

Checks chat and text completions, streaming (with usage), stop strings,
log-probabilities and the error a bad request gets. Exits non-zero with the
first failed check; prints "all checks passed" at the end.
"""

import argparse
import sys

import openai
from openai import OpenAI


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--expect-greedy", nargs=2, metavar=("PROMPT", "TEXT"),
                    help="the greedy text `wgllm run` gives for PROMPT (10 tokens)")
    a = ap.parse_args()
    c = OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=120)

    models = c.models.list()
    check([m.id for m in models.data] == [a.model], f"models.list -> {a.model}")

    # Chat, not streamed.
    r = c.chat.completions.create(
        model=a.model,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is RoPE?"}],
        max_tokens=8, temperature=0)
    ch = r.choices[0]
    check(r.object == "chat.completion", "chat: object")
    check(ch.message.role == "assistant" and isinstance(ch.message.content, str), "chat: message")
    check(ch.finish_reason == "length", "chat: finish_reason length")
    check(r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8,
          "chat: usage")
    chat_text = ch.message.content

    # Chat, streamed with usage: the same text.
    parts, finish, usage, roles = [], None, None, []
    for chunk in c.chat.completions.create(
            model=a.model,
            messages=[{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "What is RoPE?"}],
            max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    check("".join(parts) == chat_text, "chat stream: same text as not streamed")
    check(roles == ["assistant"] and finish == "length", "chat stream: role and finish_reason")
    check(usage is not None and usage.completion_tokens == 8, "chat stream: include_usage")

    # Text completion, and the greedy text of `wgllm run`.
    prompt = a.expect_greedy[0] if a.expect_greedy else "The quick brown fox"
    r = c.completions.create(model=a.model, prompt=prompt, max_tokens=10, temperature=0)
    text = r.choices[0].text
    check(r.object == "text_completion" and r.choices[0].finish_reason == "length",
          "completion: object and finish_reason")
    if a.expect_greedy:
        check(text == a.expect_greedy[1], f"completion: greedy text equals `wgllm run`'s ({text!r})")
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model=a.model, prompt=prompt, max_tokens=10,
                                       temperature=0, stream=True)
        if ch.choices)
    check(streamed == text, "completion stream: same text")

    # Stop string: from the middle of the greedy text; never returned.
    if len(text) >= 6:
        stop = text[3:5]
        at = text.find(stop)
        r = c.completions.create(model=a.model, prompt=prompt, max_tokens=10,
                                 temperature=0, stop=[stop])
        check(r.choices[0].text == text[:at] and r.choices[0].finish_reason == "stop",
              f"completion: stop {stop!r} cuts before it")
        r = c.chat.completions.create(
            model=a.model, messages=[{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "What is RoPE?"}],
            max_tokens=8, temperature=0, stop=chat_text[2:4] if len(chat_text) >= 4 else None)
        if len(chat_text) >= 4:
            cut = chat_text.find(chat_text[2:4])
            check(r.choices[0].message.content == chat_text[:cut]
                  and r.choices[0].finish_reason == "stop", "chat: stop string")

    # Log-probabilities.
    r = c.chat.completions.create(
        model=a.model, messages=[{"role": "user", "content": "hi"}],
        max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    lp = r.choices[0].logprobs.content
    check(len(lp) == 5 and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lp),
          "chat: logprobs and top_logprobs")
    check(all(t.top_logprobs[0].logprob == t.logprob for t in lp),
          "chat: greedy tokens are the most likely ones")
    r = c.completions.create(model=a.model, prompt=prompt, max_tokens=3, temperature=0, logprobs=1)
    check(len(r.choices[0].logprobs.tokens) == 3, "completion: logprobs")

    # Errors come back as the client's exceptions with the right status.
    try:
        c.chat.completions.create(model=a.model, messages=[{"role": "user", "content": "x"}], n=2)
        check(False, "n=2 is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "`n`" in str(e), "n=2 -> 400")
    bad = OpenAI(base_url=a.base_url, api_key="wrong-key", max_retries=0)
    if a.api_key != "none":
        try:
            bad.models.list()
            check(False, "a wrong key is refused")
        except openai.AuthenticationError as e:
            check(e.status_code == 401, "wrong key -> 401")
    print("all checks passed")


if __name__ == "__main__":
    main()
