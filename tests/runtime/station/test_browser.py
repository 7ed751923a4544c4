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

from tests.helpers.onnx_bundle import make_tiny_bundle
from tests.runtime.station.conftest import PASSWORDS, RunningStation, start_station, stop_station

CHROMIUM = os.environ.get("RDEDGE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RDEDGE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
DOCS = Path(__file__).resolve().parents[3] / "docs" / "station"

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[RunningStation]:
    """A station with a second bundle (another model id) offered for a hot swap."""
    root = tmp_path_factory.mktemp("browser")
    make_tiny_bundle(root / "bundles" / "seed1", seed=1)
    st = start_station(root, tiny_bundle, bundles_dir=str(root / "bundles"))
    yield st
    stop_station(st)


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

    # -- teach: collect a few good frames, the page shows progress and the train/export commands -------------------
    drv.get(station.url + "/teach")
    _wait(drv, lambda d: d.find_element(By.ID, "t-state").text == "idle", what="the teach page")
    drv.find_element(By.ID, "t-n").clear()
    drv.find_element(By.ID, "t-n").send_keys("3")
    drv.find_element(By.ID, "t-interval").clear()
    drv.find_element(By.ID, "t-interval").send_keys("0.2")
    drv.find_element(By.ID, "t-name").send_keys("part-b")
    drv.find_element(By.ID, "t-start").click()
    _wait(drv, lambda d: d.find_element(By.ID, "t-state").text == "collected", what="3 frames collected")
    assert drv.find_element(By.ID, "t-progress").get_attribute("value") == "3"
    assert "rdedge train --data" in drv.find_element(By.ID, "t-commands").text
    assert len(list((station.cfg.ui.state_dir / "teach" / "part-b" / "train" / "good").glob("*.png"))) == 3
    _shot(drv, shots, "teach")

    # -- hot swap from the model page, then roll back --------------------------------------------------------------
    drv.get(station.url + "/models")
    _wait(drv, lambda d: d.find_element(By.ID, "m-id").text == "tiny-rd-s64-seed0", what="the model page")
    assert drv.find_element(By.ID, "rollback").get_attribute("disabled") is not None  # nothing swapped yet
    _wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, '#bundles tr[data-name="seed1"] button.swap'), what="swap")
    drv.find_element(By.CSS_SELECTOR, '#bundles tr[data-name="seed1"] button.swap').click()
    _wait(drv, lambda d: d.find_element(By.ID, "m-id").text == "tiny-rd-s64-seed1"
          and d.find_element(By.ID, "m-state").text == "idle", 30, "the swap")  # fmt: skip
    _shot(drv, shots, "models")
    drv.get(station.url + "/live")
    _wait(drv, lambda d: d.find_element(By.CSS_SELECTOR, '[data-g="model_id"]').text == "tiny-rd-s64-seed1",
          what="the new model on the live page")  # fmt: skip
    drv.get(station.url + "/models")
    _wait(drv, lambda d: d.find_element(By.ID, "rollback").get_attribute("disabled") is None, what="rollback")
    drv.find_element(By.ID, "rollback").click()
    _wait(drv, lambda d: d.find_element(By.ID, "m-id").text == "tiny-rd-s64-seed0"
          and d.find_element(By.ID, "m-state").text == "idle", 30, "the rollback")  # fmt: skip
    assert sorted(p.name for p in shots.iterdir()) == ["archive.png", "audit.png", "live.png", "login.png",
                                                       "models.png", "teach.png", "threshold.png"]  # fmt: skip
