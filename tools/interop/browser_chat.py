"""The chat page of `lntune serve` in a real browser (headless Chromium through Selenium and
chromedriver; tests/serve.rs): picks a model, attaches an image through the file input,
sends a question, waits for the streamed answer to finish, prints it as JSON."""

import argparse
import json
import shutil

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", required=True)
    a = ap.parse_args()
    opts = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    chromium = shutil.which("chromium")
    if chromium:
        opts.binary_location = chromium
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        driver.get(f"http://127.0.0.1:{a.port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) > 0)
        models = [o.text for o in driver.find_elements(By.CSS_SELECTOR, "#model option")]
        Select(driver.find_element(By.ID, "model")).select_by_value(a.model)
        driver.find_element(By.ID, "image").send_keys(a.image)
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image"))
        driver.find_element(By.ID, "text").send_keys(a.prompt)
        driver.find_element(By.ID, "send").click()
        done = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".assistant[data-done='1']")))
        answer = done.find_element(By.TAG_NAME, "span").text
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".error")]
        shown = len(driver.find_elements(By.CSS_SELECTOR, ".user img"))
        print(json.dumps({"models": models, "answer": answer, "errors": errors, "images_shown": shown}))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
