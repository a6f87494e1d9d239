"""Tier 4: ComfyUI's own web page in headless Chromium, driven by Playwright, against a real server.

The browser is Debian's chromium (Playwright cannot download its own here) and the driver is the `playwright`
package; `bash scripts/setup_browser.sh` installs both. Screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

import pytest
from comfy_page import CHROMIUM_ARGS, VIEWPORT, ComfyPage, chromium_path, store_ui_settings


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "browser: drives ComfyUI's web page in headless Chromium")


@pytest.fixture(scope="module")
def ui_server(comfy_server):
    store_ui_settings(comfy_server.url)
    return comfy_server


@pytest.fixture(scope="module")
def object_info(ui_server) -> dict:
    return ui_server.get("/object_info")


@pytest.fixture(scope="module")
def pack_module(object_info) -> str:
    """The folder name ComfyUI loaded this pack from (what the page uses in extension URLs)."""
    return object_info["InstructEdit"]["python_module"].split(".")[1]


@pytest.fixture(scope="module")
def our_nodes(object_info, pack_module) -> dict[str, dict]:
    return {name: info for name, info in object_info.items()
            if info.get("python_module") == f"custom_nodes.{pack_module}"}


@pytest.fixture(scope="module")
def browser(ui_server):
    # Module scope on purpose: Playwright's sync API keeps an event loop marked as running while it lives, and
    # other test tiers call asyncio.run() in this process.
    path = chromium_path()
    if path is None:
        pytest.fail("no chromium found: run `bash scripts/setup_browser.sh` (or set IP2P_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run `bash scripts/setup_browser.sh`")
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def ui(browser, ui_server, pack_module):
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    page = ComfyPage(context.new_page(), ui_server.url, pack_module)
    try:
        page.open()
        yield page
    finally:
        context.close()
    assert not page.page_errors, f"uncaught errors in the page: {page.page_errors}"
    assert not page.failed_requests, f"failed requests for this pack's files: {page.failed_requests}"
