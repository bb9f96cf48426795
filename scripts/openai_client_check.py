#!/usr/bin/env python3
"""`dllm serve` through clients no one here wrote: the official `openai`
Python package (whole and streamed completions and chat, the extension
fields through `extra_body`, its error classes) and `curl -N` for the raw
server-sent events.

Starts target/release/dllm (build it first) on models/tiny-arith on a free
loopback port with an API key, runs the checks, then stops the server with
SIGTERM and checks that it exits with status 0. Prints one line per check
and ends with "openai_client_check: N passed, M failed"; the exit status is
1 when any check failed.

    python3 -m pip install openai
    python3 scripts/openai_client_check.py
"""

import json
import os
import subprocess
import sys
import traceback

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "dllm")
MODEL = os.path.join(ROOT, "models", "tiny-arith")
KEY = "check-key"
PROMPT = "add 0000004821+0000000937="
# 4821 + 937, as the model writes it (README, Quick start).
ANSWER = "00000005758"


def start_server():
    server = subprocess.Popen(
        [BINARY, "serve", "--model", MODEL, "--port", "0", "--api-key", KEY],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = server.stdout.readline().strip()
    prefix = "listening on "
    if not line.startswith(prefix):
        server.kill()
        sys.exit(f"the server did not start: first line {line!r}")
    return server, line[len(prefix):]


def run_checks(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
    model = client.models.list().data[0].id

    def models():
        assert model == "tiny-arith", model

    def completion():
        out = client.completions.create(model=model, prompt=PROMPT, max_tokens=64)
        choice = out.choices[0]
        assert choice.text == ANSWER, choice.text
        assert choice.finish_reason == "stop", choice.finish_reason
        usage = out.usage
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert usage.model_extra["nfe"] >= 1, usage

    def completion_streamed():
        chunks = list(client.completions.create(model=model, prompt=PROMPT, stream=True))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == ANSWER, text
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert chunks[-1].usage.model_extra["nfe"] >= 1

    def chat():
        messages = [{"role": "user", "content": PROMPT}]
        out = client.chat.completions.create(model=model, messages=messages)
        content = out.choices[0].message.content
        assert out.choices[0].message.role == "assistant"
        streamed = client.chat.completions.create(model=model, messages=messages, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
        assert "".join(pieces) == content, (pieces, content)
        assert content, "an empty answer"

    def extension_fields():
        out = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=64,
            extra_body={"cache": "prefix", "threshold": None, "return_token_ids": True},
        )
        choice = out.choices[0]
        assert choice.text == ANSWER, choice.text
        assert len(choice.model_extra["token_ids"]) == 64
        # The fixed schedule: one token a step, 64 forwards.
        assert out.usage.model_extra["nfe"] == 64, out.usage

    def bad_request():
        try:
            client.completions.create(model=model, prompt=PROMPT, extra_body={"cache": "quad"})
        except openai.BadRequestError as e:
            assert e.status_code == 400
            assert e.body["param"] == "cache", e.body
        else:
            raise AssertionError("cache quad was accepted")

    def wrong_key():
        stranger = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
        try:
            stranger.completions.create(model=model, prompt=PROMPT)
        except openai.AuthenticationError as e:
            assert e.status_code == 401
        else:
            raise AssertionError("a wrong key was accepted")

    def curl_raw_events():
        body = json.dumps({"prompt": PROMPT, "stream": True, "return_token_ids": True})
        out = subprocess.run(
            ["curl", "-sSN", "--max-time", "60", f"{base}/v1/completions",
             "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json",
             "-d", body],
            capture_output=True, text=True, check=True,
        ).stdout
        events = [e for e in out.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events), out
        assert events[-1] == "data: [DONE]", events[-1]
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == ANSWER, text
        assert chunks[-1]["usage"]["nfe"] >= 1

    checks = [models, completion, completion_streamed, chat, extension_fields,
              bad_request, wrong_key, curl_raw_events]
    failed = 0
    for check in checks:
        try:
            check()
            print(f"ok    {check.__name__}")
        except Exception:
            failed += 1
            print(f"FAIL  {check.__name__}\n{traceback.format_exc()}")
    return len(checks) - failed, failed


def main():
    server, base = start_server()
    try:
        passed, failed = run_checks(base)
    finally:
        server.terminate()
        try:
            status = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            status = "none within 60 s"
    print(f"ok    the server stopped on SIGTERM with status {status}" if status == 0
          else f"FAIL  the server stopped on SIGTERM with status {status}")
    if status == 0:
        passed += 1
    else:
        failed += 1
    print(f"openai_client_check: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
