"""The create form's fit panel in a real browser: as the user types, it shows the weights, the KV cache of one
sequence and of a full batch, and says when a full batch does not fit; choosing an fp8 KV cache makes it fit.
Screenshots in test-artifacts/browser/fit-*.png."""

import json

import pytest
from playwright.sync_api import expect

from tests.browser_support import chromium_page, sign_in
from tests.conftest import ARTIFACTS
from tests.factories import GpuTypeFactory, HostFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]

LLAMA_3_1_8B = {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "max_position_embeddings": 131072,
}  # fmt: skip


def test_the_fit_panel_follows_the_engine_options(live_server, settings, tmp_path):
    settings.HF_CACHE_DIR = str(tmp_path)
    snapshot = tmp_path / "models--acme--llama-8b" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    (tmp_path / "models--acme--llama-8b" / "refs").mkdir()
    (tmp_path / "models--acme--llama-8b" / "refs" / "main").write_text("0123abc")
    UserFactory(username="fay", password="fay-password-1")
    a100 = GpuTypeFactory(name="A100-80GB", memory_gb=80, uses_devices=True)
    HostFactory(name="gpu-1", gpu_type=a100, gpu_count=8)
    shots = ARTIFACTS / "browser"
    shots.mkdir(parents=True, exist_ok=True)

    with chromium_page(width=1280, height=1100, timeout_ms=20_000) as page:
        sign_in(page, f"{live_server.url}/login/", "fay", "fay-password-1")

        page.goto(f"{live_server.url}/deployments/new")
        page.select_option("select[name=gpu]", label="A100-80GB")
        page.fill("input[name=num_gpus]", "1")
        page.fill("input[name=max_batch_size]", "64")
        page.click("summary:has-text('Engine options')")
        page.fill("input[name=max_model_len]", "8192")
        page.fill("input[name=hf_repo]", "acme/llama-8b")
        panel = page.locator("#estimate")
        expect(panel.locator("#fit-estimate")).to_contain_text("16.1 GB")
        expect(panel).to_contain_text("KV cache, a full batch of 64")
        expect(panel.locator(".fit-warning")).to_contain_text("a full batch does not (84.8 GB)")
        expect(panel.locator(".fit-warning")).to_contain_text("about 52 sequences of 8192 tokens")
        panel.screenshot(path=shots / "fit-warning.png")

        page.select_option("select[name=kv_cache_dtype]", "fp8")
        page.locator("input[name=max_model_len]").dispatch_event("input")
        expect(panel).to_contain_text("Fits: 50.4 GB with a full batch")
        panel.screenshot(path=shots / "fit-ok.png")
