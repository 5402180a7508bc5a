"""Drive the Prefect UI in headless Chromium (selenium) and save screenshots for integration tests.

Targets the default ("V1", Vue) UI served by ``prefect server start`` in Prefect 3.9: a flow run lives at
``/runs/flow-run/<id>``, its tabs are ``ul[role=tablist] > li`` labelled "Subflow Runs", "Artifacts", ...,
and an artifact card on the Artifacts tab links to ``/artifacts/artifact/<id>``, where markdown is rendered.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN", "/usr/bin/chromedriver")
# fmt: off
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
)
# fmt: on
_FIND_LINK_JS = (
    "return [...document.querySelectorAll(arguments[0])]"
    ".find(a => a.offsetParent !== null && a.textContent.trim() === arguments[1]) || null;"
)
_ARTIFACT_BODY = ".artifact-data-view"  # rendered artifact data (markdown, table, ...) on /artifacts/artifact/<id>
_RETRY = (NoSuchElementException, StaleElementReferenceException, ElementClickInterceptedException)


def _new_driver(profile_dir: str) -> WebDriver:
    """Start headless Chromium with the local chromedriver (never lets selenium download one)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def _squash(text: str) -> str:
    return " ".join(text.split())


def _type(element: WebElement, text: str) -> bool:
    element.clear()
    element.send_keys(text)
    return True


class _Ui:
    """Small wait/click toolkit sharing one overall deadline; the Vue UI re-renders, so stale elements are retried."""

    def __init__(self, driver: WebDriver, deadline: float) -> None:
        self.driver, self.deadline = driver, deadline

    def wait(self, what: str, condition: Callable[[WebDriver], Any], limit: float | None = None) -> Any:
        """Poll ``condition`` until truthy; raise AssertionError naming ``what`` at the deadline."""
        left = max(1.0, self.deadline - time.monotonic())
        waiter = WebDriverWait(self.driver, min(left, limit or left), poll_frequency=0.5, ignored_exceptions=_RETRY)
        try:
            return waiter.until(condition)
        except TimeoutException:
            raise AssertionError(f"Prefect UI: {what} not found (at {self.driver.current_url})") from None

    def click(self, what: str, find: Callable[[WebDriver], WebElement | None]) -> None:
        """Wait until ``find`` returns an element and a click on it goes through."""

        def attempt(driver: WebDriver) -> bool:
            element = find(driver)
            if element is None:
                return False
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
            element.click()
            return True

        self.wait(what, attempt)

    def tab(self, label: str) -> None:
        """Click the flow-run page tab called ``label``."""
        xpath = f"//ul[@role='tablist']/li[normalize-space()='{label}']"
        self.click(f"tab {label!r}", lambda d: d.find_element(By.XPATH, xpath))

    def link(self, scope_css: str, text: str) -> WebElement | None:
        """The first rendered link under ``scope_css`` whose text is exactly ``text`` (one round trip)."""
        return self.driver.execute_script(_FIND_LINK_JS, f"{scope_css} a", text)

    def shows(self, text: str) -> bool:
        return _squash(text) in _squash(self.driver.find_element(By.TAG_NAME, "body").text)

    def text(self, css: str) -> str:
        return " ".join(e.text for e in self.driver.find_elements(By.CSS_SELECTOR, css)).strip()

    def heading_is(self, text: str) -> bool:
        crumbs = self.driver.find_elements(By.CSS_SELECTOR, ".page-heading .p-bread-crumbs__crumb:last-child")
        return bool(crumbs) and crumbs[0].text.strip() == text


def _open_subject(ui: _Ui, name: str, shot: Path) -> None:
    """Batch run page: Subflow Runs tab, search the subject's name, screenshot, click its link."""
    ui.tab("Subflow Runs")
    scope = "#subflow-runs-content"
    ui.wait("subflow runs list", lambda d: d.find_elements(By.CSS_SELECTOR, f"{scope} .results-count"))
    search_css = f"{scope} .search input"  # narrow the (paginated) list by run name, as a user would
    ui.wait("subflow run search box", lambda d: _type(d.find_element(By.CSS_SELECTOR, search_css), name))
    link = ui.wait(f"link to subflow run {name!r}", lambda d: ui.link(scope, name))
    ui.driver.execute_script("arguments[0].scrollIntoView({block: 'nearest'});", link)
    ui.driver.save_screenshot(str(shot))
    ui.click(f"link to subflow run {name!r}", lambda d: ui.link(scope, name))
    ui.wait(f"flow run page of {name!r}", lambda d: ui.heading_is(name))


def _find_verdict(ui: _Ui, verdict: str, artifact_key: str) -> None:
    """Subject run page: Artifacts tab, open the card of ``artifact_key`` (as a user picks the selection report
    by its name), and wait for ``verdict`` on the artifact's page, where its markdown is rendered."""
    ui.tab("Artifacts")
    cards_css = "#artifacts-content a[href*='/artifacts/artifact/']"

    def card(driver: WebDriver) -> WebElement | None:
        for link in driver.find_elements(By.CSS_SELECTOR, cards_css):
            if artifact_key in _squash(link.text).split(" "):
                return link
        # Artifacts sit in virtual scrollers (the flow run's own, then the task runs'): a chunk renders its
        # cards once it is scrolled into view.
        driver.execute_script(
            "document.querySelectorAll('#artifacts-content .p-virtual-scroller-chunk')"
            ".forEach(chunk => { if (!chunk.querySelector('a')) chunk.scrollIntoView({block: 'center'}); });"
        )
        return None

    ui.wait(f"artifact card {artifact_key!r}", card)
    ui.click(f"artifact card {artifact_key!r}", card)
    ui.wait(
        f"verdict {verdict!r} on the page of {artifact_key!r}", lambda d: ui.text(_ARTIFACT_BODY) and ui.shows(verdict)
    )


def show_subject_verdict(
    ui_url: str,
    batch_run_id: str,
    subject_run_name: str,
    verdict_text: str,
    out_dir: Path,
    artifact_key: str,
    timeout: float = 90,
) -> list[Path]:
    """Click from the batch run to the subject's subflow run and its artifact ``artifact_key`` until
    ``verdict_text`` shows.

    ``verdict_text`` is matched against rendered text (no markdown markup), whitespace-normalised.
    Saves ``1-batch-run.png``, ``2-subject-run.png``, ``3-artifacts.png`` under ``out_dir`` and returns them;
    on failure saves ``failure.png`` and ``failure.html`` and raises AssertionError naming what was missing.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    shots = [out_dir / name for name in ("1-batch-run.png", "2-subject-run.png", "3-artifacts.png")]
    profile = tempfile.mkdtemp(prefix="prefect-ui-chromium-")
    driver: WebDriver | None = None
    try:
        driver = _new_driver(profile)
        driver.set_page_load_timeout(timeout)
        ui = _Ui(driver, time.monotonic() + timeout)
        driver.get(f"{ui_url.rstrip('/')}/runs/flow-run/{batch_run_id}")
        ui.wait(f"batch flow run page {batch_run_id}", lambda d: d.find_elements(By.CSS_SELECTOR, "ul[role=tablist]"))
        _open_subject(ui, subject_run_name, shots[0])
        parent_css = f".flow-run-parent-flow-run a[href$='/runs/flow-run/{batch_run_id}']"
        ui.wait(  # also proves the subject really is a subflow run of this batch
            f"'Parent Run' link to {batch_run_id} on {subject_run_name!r}",
            lambda d: any(a.text.strip() for a in d.find_elements(By.CSS_SELECTOR, parent_css)),
        )
        driver.save_screenshot(str(shots[1]))
        _find_verdict(ui, verdict_text, artifact_key)
        driver.save_screenshot(str(shots[2]))
        return shots
    except (AssertionError, WebDriverException) as exc:
        if driver is not None:
            try:
                driver.save_screenshot(str(out_dir / "failure.png"))
                (out_dir / "failure.html").write_text(driver.page_source)
            except WebDriverException:
                pass
        if isinstance(exc, AssertionError):
            raise
        raise AssertionError(f"Prefect UI browser session failed: {exc.msg}") from exc
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
