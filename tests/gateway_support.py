"""Helpers for tests of the OpenAI-compatible gateway through Django's test client."""

import json


def chat(client, headers, **body):
    """POST a one-message chat completion with `body` merged in; returns the test client's response."""
    payload = {"messages": [{"role": "user", "content": "hi"}], **body}
    return client.post("/v1/openai/chat/completions", json.dumps(payload), content_type="application/json", **headers)


def assert_openai_error(response, status, code):
    """`response` is an OpenAI-shaped error (``{"error": {"message", "type", "code"}}``) with `status` and `code`."""
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
