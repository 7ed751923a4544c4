"""The station page in a real headless Chromium (Debian ``chromium`` + ``chromium-driver``, through selenium):
log in, watch the live view update without a reload, review an archived frame, move and apply the threshold.

Screenshots go to the test's tmp dir and a copy of each page to ``docs/station/`` (the README shows them).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runtime.station.conftest import PASSWORDS, RunningStation

CHROMIUM = os.environ.get("RDEDGE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RDEDGE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
DOCS = Path(__file__).resolve().parents[3] / "docs" / "station"

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--force-device-scale-factor=1"):  # fmt: skip
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def _shot(drv: webdriver.Chrome, out: Path, name: str) -> None:
    """Full-page screenshot (viewport stretched to the page height through CDP)."""
    out.mkdir(parents=True, exist_ok=True)
    height = int(drv.execute_script("return document.documentElement.scrollHeight"))
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                        {"width": 1280, "height": max(700, min(height, 2400)), "deviceScaleFactor": 1,
                         "mobile": False})  # fmt: skip
    path = out / f"{name}.png"
    assert drv.save_screenshot(str(path)), name
    drv.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    DOCS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, DOCS / f"{name}.png")


def _wait(drv: webdriver.Chrome, cond: object, timeout: float = 20, what: str = "") -> object:
    wait = WebDriverWait(drv, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])
    return wait.until(cond, what)  # type: ignore[arg-type]


def test_station_in_a_browser(station: RunningStation, browser: webdriver.Chrome, tmp_path: Path) -> None:
    drv, shots = browser, tmp_path / "screenshots"

    # -- log in (a wrong password first: the page says so and stays on /login) -----------------------------------
    drv.get(station.url + "/live")
    _wait(drv, lambda d: d.current_url.endswith("/login"), what="redirect to /login")
    drv.find_element(By.ID, "user").send_keys("erik")
    drv.find_element(By.ID, "password").send_keys("wrong-password")
    drv.find_element(By.ID, "login").click()
    _wait(drv, lambda d: "wrong user name" in d.find_element(By.ID, "login-error").text, what="login error")
    _shot(drv, shots, "login")
    drv.find_element(By.ID, "password").clear()
    drv.find_element(By.ID, "password").send_keys(PASSWORDS["erik"])
    drv.find_element(By.ID, "login").click()
    _wait(drv, lambda d: d.current_url.endswith("/live"), what="the live page")

    # -- live view updates without a reload ------------------------------------------------------------------------
    drv.execute_script("window.__same_page = 42")
    seq = lambda d: d.find_element(By.CSS_SELECTOR, 'section[data-camera="cam1"] [data-f="seq"]').text  # noqa: E731
    _wait(drv, lambda d: seq(d).isdigit(), what="a first verdict on the page")
    first = int(seq(drv))
    _wait(drv, lambda d: seq(d).isdigit() and int(seq(d)) > first + 3, what="the live view to update")
    assert drv.execute_script("return window.__same_page") == 42  # no reload happened
    _wait(drv, lambda d: d.execute_script("return document.getElementById('img-cam1').naturalWidth") == 128,
          what="the live overlay image")  # fmt: skip
    src1 = drv.find_element(By.ID, "img-cam1").get_attribute("src")
    _wait(drv, lambda d: d.find_element(By.ID, "img-cam1").get_attribute("src") != src1, what="a newer live image")
    verdict = drv.find_element(By.CSS_SELECTOR, 'section[data-camera="cam1"] [data-f="verdict"]').text
    assert verdict in ("OK", "NG")
    assert drv.find_element(By.CSS_SELECTOR, '[data-g="broker"]').text == "connected"
    assert drv.find_element(By.CSS_SELECTOR, 'section[data-camera="cam1"] [data-f="state"]').text == "up"
    _shot(drv, shots, "live")

    # -- review an archived NG frame ---------------------------------------------------------------------------------
    drv.get(station.url + "/archive?verdict=NG")
    _wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "#archive figure.item.NG"), what="archived NG frames")
    assert not drv.find_elements(By.CSS_SELECTOR, "#archive figure.item.OK")  # the filter from the URL
    name = drv.find_elements(By.CSS_SELECTOR, "#archive figure.item.NG")[0].get_attribute("data-name")
    card = f'#archive figure[data-name="{name}"]'
    _wait(drv, lambda d: d.execute_script(f"return document.querySelector('{card} img').naturalWidth") > 0,
          what="the archived overlay")  # fmt: skip
    drv.find_element(By.CSS_SELECTOR, f"{card} button.mark.false_reject").click()
    css = f'#archive figure[data-name="{name}"] .review'
    _wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, css) and "false reject (erik)" in
          d.find_element(By.CSS_SELECTOR, css).text, what="the review on the page")  # fmt: skip
    good = station.cfg.ui.archive.good_dir
    assert good is not None and (good / f"{name}.png").is_file()
    time.sleep(0.3)  # let the toast fade in for the picture
    _shot(drv, shots, "archive")

    # -- threshold tool: move the slider, see the implied counts, apply ---------------------------------------------
    drv.get(station.url + "/threshold")
    _wait(drv, lambda d: d.find_element(By.ID, "p-frames").text.isdigit(), what="the score history")
    current = float(drv.find_element(By.ID, "t-current").text)
    frames = int(drv.find_element(By.ID, "p-frames").text)
    assert drv.find_element(By.ID, "p-good").text == "1"  # the frame just reviewed as a false reject
    slider = drv.find_element(By.ID, "slider")
    lo = float(slider.get_attribute("min"))
    # move it to the bottom, where every recent frame would be NG, then to just above the current threshold
    drv.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))", slider, lo)
    assert int(drv.find_element(By.ID, "p-ng").text) == frames
    target = current * 1.02
    drv.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))", slider, target
    )
    shown = float(drv.find_element(By.ID, "t-value").text)
    assert abs(shown - target) / target < 1e-3
    ok, ng = int(drv.find_element(By.ID, "p-ok").text), int(drv.find_element(By.ID, "p-ng").text)
    assert ok + ng == frames and ng < frames
    drv.find_element(By.ID, "apply").click()
    _wait(drv, lambda d: "threshold" in d.find_element(By.ID, "toast").text, what="the apply confirmation")
    time.sleep(0.3)
    _shot(drv, shots, "threshold")
    with station.client("olga") as c:
        station.wait(lambda: abs(c.get("/api/live").json()["threshold"] - shown) / shown < 1e-3, 10,
                     "the threshold in force")  # fmt: skip

    # -- audit page shows what was done ------------------------------------------------------------------------------
    drv.get(station.url + "/audit")
    _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#audit tbody tr")) >= 3, what="audit rows")
    text = drv.find_element(By.ID, "audit").text
    assert "threshold" in text and "review" in text and "login_failed" in text
    _shot(drv, shots, "audit")

    # -- model page: the running bundle, rollback disabled (nothing swapped yet) ------------------------------------
    drv.get(station.url + "/models")
    _wait(drv, lambda d: d.find_element(By.ID, "m-id").text.startswith("tiny-rd"), what="the model page")
    assert drv.find_element(By.ID, "rollback").get_attribute("disabled") is not None
    _shot(drv, shots, "models")
    assert sorted(p.name for p in shots.iterdir()) == ["archive.png", "audit.png", "live.png", "login.png",
                                                       "models.png", "threshold.png"]  # fmt: skip
