"""The chat page at / in a real headless chromium: type, see the reply stream in, see a 4xx shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gptforge.model.checkpoint import save_checkpoint
from gptforge.model.generate import generate_text
from gptforge.model.tokenizer import Tokenizer
from gptforge.tasks.instruct import get_prompt_style

from .cdp import CHROMIUM, Browser
from .conftest import tiny_model

pytest.importorskip("fastapi")
# Skipped only off CI: .ci/run installs chromium, and there a missing browser is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="needs chromium (Debian: apt-get install chromium)"
)

ALPACA = get_prompt_style("alpaca")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from .test_server import Server

    root = tmp_path_factory.mktemp("page")
    model = tiny_model(seed=5, context_length=256)
    save_checkpoint(model, root / "chatty", metadata={"prompt_style.json": ALPACA.to_dict()})
    server = Server(root / "chatty", root / "server.log").wait_ready()
    browser = Browser(root / "profile")
    try:
        browser.open(server.url + "/")
        browser.wait_for(
            "(document.getElementById('model') || {textContent: ''}).textContent.startsWith('chatty')"
        )
        yield browser, model, root
    finally:
        browser.close()
        server.stop()


def test_typing_a_message_streams_the_reply_into_the_page(page):
    browser, model, root = page
    assert browser.eval("document.getElementById('model').textContent") == "chatty (alpaca)"
    assert "temperature 0, top_p 1, max_tokens 128 (greedy)" in browser.eval(
        "document.getElementById('settings').textContent"
    )
    # every change of the reply's text is recorded, to see it arrive in pieces
    browser.eval(
        "window.__seen = []; new MutationObserver(() => { const m = document.querySelector('.assistant');"
        " if (m) __seen.push(m.textContent.length); }).observe(document.getElementById('log'),"
        " {subtree: true, childList: true, characterData: true}); true"
    )
    browser.eval("document.getElementById('input').focus()")
    browser.type("Name a color.")
    browser.press_enter()
    browser.wait_for(
        "document.querySelector('.assistant') && document.querySelector('.assistant').dataset.done"
    )
    text = browser.eval("document.querySelector('.assistant').textContent")
    record = {"instruction": "Name a color.", "input": ""}
    want = generate_text(
        model, Tokenizer(), ALPACA.format_prompt(record), max_new_tokens=128, stop_strings=ALPACA.stop_strings
    )[0]
    assert text == want and text
    assert browser.eval("document.querySelector('.user').textContent") == "Name a color."
    assert len(set(browser.eval("window.__seen"))) >= 3  # the text grew in several steps: streamed
    if os.environ.get("GPTFORGE_SCREENSHOT"):  # the README's picture: GPTFORGE_SCREENSHOT=docs/serve-chat.png
        browser.screenshot(Path(os.environ["GPTFORGE_SCREENSHOT"]))


def test_a_4xx_answer_is_shown_in_the_page(page):
    browser, _, _ = page
    browser.eval("document.getElementById('max_tokens').value = '100000'; true")
    browser.eval("document.getElementById('input').focus()")
    browser.type("Hello")
    browser.press_enter()
    err = browser.wait_for("document.querySelector('.error') && document.querySelector('.error').textContent")
    assert err.startswith("400: max_tokens=100000 must be between 1 and")
