"""The coordinator's live page in headless Chromium over a real stack: it loads, lists the stack's
instances with their roles and states and the recent latencies, and shows a role flip
(``pdmesh ctl flip``) and a killed worker as they happen.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make`` installs them); without them the tests
fail naming what is missing. ``PDMESH_DASHBOARD_SCREENSHOT=path.png`` saves the final page
(docs/img/dashboard.png was taken so).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdmesh.launcher import LocalStack
from tests.e2e.conftest import start_stack
from tests.e2e.test_control_plane import ctl

pytestmark = pytest.mark.timeout(120)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Fast health: a killed worker is suspect after 1.5 s and leaves the view after 3 s.
HEALTH = {
    "heartbeat-interval-s": "0.2",
    "suspect-after-s": "1.5",
    "dead-after-s": "3.0",
    "probe-interval-s": "0.5",
}
# The page refreshes every 2 s; a change must show within the controller's reaction plus a refresh.
PAGE_WAIT_S = 30


@pytest.fixture(scope="module")
def stack(tiny_qwen3, tmp_path_factory) -> Iterator[LocalStack]:
    stack = start_stack(tiny_qwen3, tmp_path_factory, prefill=2, decode=1, controller_args=HEALTH)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: install Debian's chromium and chromium-driver (make)")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=960,420"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


ROWS_JS = """return Array.from(document.querySelectorAll('#instances tr'),
    r => [r.cells[0].textContent, r.cells[1].textContent, r.cells[2].textContent]);"""


def rows(driver) -> dict[str, tuple[str, str]]:
    """What the page's instance table shows: {instance: (role, state)} (read in one go: it re-renders)."""
    return {name: (role, state) for name, role, state in driver.execute_script(ROWS_JS)}


def wait_page(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, PAGE_WAIT_S, poll_frequency=0.2).until(lambda d: condition(d))
    except Exception as exc:
        raise AssertionError(
            f"{what} not on the page within {PAGE_WAIT_S}s; it shows {rows(driver)}"
        ) from exc


def complete(stack: LocalStack, max_tokens: int = 4) -> None:
    body = {"prompt": "The sea is", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text


def test_data_has_the_documented_shape(stack):
    complete(stack)
    data = httpx.get(f"{stack.base_url}/dashboard/data", timeout=10).json()
    assert sorted(i["id"] for i in data["instances"]) == ["decode-0", "prefill-0", "prefill-1"]
    decode = next(i for i in data["instances"] if i["id"] == "decode-0")
    assert decode["role"] == "decode" and decode["state"] == "healthy"
    assert decode["kv_total"] > 0 and 0 <= decode["kv_free"] <= decode["kv_total"]
    assert isinstance(data["ratio"], str) and data["ratio"]
    assert data["latency"]["ttft_p50"] > 0 and data["latency"]["e2e_p99"] >= data["latency"]["ttft_p50"]
    assert data["requests_per_s"] > 0


def test_the_page_lists_the_instances_and_latencies(stack, browser):
    complete(stack)
    browser.get(f"{stack.base_url}/dashboard")
    expected = {"prefill-0": ("prefill", "healthy"), "prefill-1": ("prefill", "healthy")}
    expected["decode-0"] = ("decode", "healthy")
    wait_page(browser, lambda d: rows(d) == expected, "the stack's three healthy instances")
    ttft = browser.find_element("id", "ttft").text
    assert ttft.count("ms") + ttft.count(" s") == 3, ttft  # three percentiles with units


def test_a_role_flip_and_a_killed_worker_show_on_the_page(stack, browser):
    browser.get(f"{stack.base_url}/dashboard")
    wait_page(browser, lambda d: rows(d).get("prefill-1") == ("prefill", "healthy"), "prefill-1 as prefill")
    flipped = ctl(stack, "flip", "prefill-1", "decode")
    assert flipped.returncode == 0, flipped.stderr
    wait_page(browser, lambda d: rows(d).get("prefill-1") == ("decode", "healthy"), "prefill-1 as decode")
    stack.kill("prefill-1")  # SIGKILL
    wait_page(browser, lambda d: rows(d).get("prefill-1", ("", ""))[1] == "gone", "prefill-1 gone")
    assert rows(browser)["decode-0"] == ("decode", "healthy")
    complete(stack)  # the rest of the stack still serves
    screenshot = os.environ.get("PDMESH_DASHBOARD_SCREENSHOT")
    if screenshot:
        wait_page(browser, lambda d: "–" not in d.find_element("id", "ttft").text, "latencies")
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(screenshot)
