"""The human preference page (launch/annotate.py) driven by a real headless Chromium (Debian's
`chromium` and `chromium-driver`, through Selenium), and `judge.py agreement` on the verdicts.

Two annotators judge 5 prompts, one with the keys and one with the buttons, each aiming at a
verdict set by hand here: the test finds A's answer on the screen by its text, so it checks
that the order is random and that the stored verdicts are A's, un-flipped. The server is
restarted mid-way and the first annotator resumes at the prompt after their last verdict. The
agreement figures are then the ones computed by hand below. Skipped only where Chromium or its
driver is missing (CI installs them)."""

import json
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from lima_jax.errors import ConfigError
from lima_jax.evaluation.agreement import agreement, pair_agreement
from lima_jax.evaluation.human import Annotation
from tests.conftest import ROOT
from tests.serving_fixtures import free_port
from tests.test_judge import write_jsonl

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")

QUESTIONS = ["What is 2 plus 3?", "Name a colour.", "Give me one tip about sleep.", "What is the opposite of hot?",
             "Convert 2 km to meters."]
A_ANSWERS = [f"A says: answer {i} from the first file." for i in range(5)]
B_ANSWERS = [f"B says: answer {i} from the baseline." for i in range(5)]
# The verdicts each annotator gives (A's outcome against B), and the judge's, set by hand.
ANN = ["win", "tie", "loss", "win", "win"]
BOB = ["win", "loss", "loss", "tie", "loss"]
JUDGE = ["win", "tie", "win", "tie", "loss"]
# Tie-discounted agreement by hand: 1 if equal, 0.5 if exactly one is a tie, else 0.
#   ann-bob:   1 + .5 + 1 + .5 + 0 = 3.0 of 5
#   judge-ann: 1 + 1 + 0 + .5 + 0  = 2.5 of 5
#   judge-bob: 1 + .5 + 0 + 1 + 1  = 3.5 of 5;  judge-humans pooled: 6.0 of 10
EXPECTED = {"ann-bob": 0.6, "judge-ann": 0.5, "judge-bob": 0.7, "judge-pooled": 0.6}


class Server:
    """launch/annotate.py as a subprocess; `restart` stops it and starts it again on the same port."""

    def __init__(self, args: list[str], log_path):
        self.args, self.port, self.log_path, self.proc = args, free_port(), log_path, None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "annotate.py"), *self.args,
                                      "--port", str(self.port)], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            assert self.proc.poll() is None, open(self.log_path).read()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                assert time.time() < deadline, "annotate.py did not start:\n" + open(self.log_path).read()[-3000:]
                time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def a_is_first(driver, item: int) -> bool:
    """Where A's answer is on the screen, read from the page's text (not from the code's order)."""
    first, second = (driver.find_element("id", i).text for i in ("answer-1", "answer-2"))
    assert {first, second} == {A_ANSWERS[item], B_ANSWERS[item]}
    return first == A_ANSWERS[item]


def choice_for(outcome: str, a_first: bool) -> str:
    """The button that gives A `outcome` with A shown first or second."""
    if outcome == "tie":
        return "tie"
    return "first" if (outcome == "win") == a_first else "second"


def wait_for(driver, condition, what: str, timeout: float = 20):
    """Until `condition()` holds; an element that went away with the page it was on is retried."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.time() + timeout
    while True:
        try:
            if condition():
                return
        except (NoSuchElementException, StaleElementReferenceException):
            pass
        assert time.time() < deadline, f"timed out waiting for {what}: {driver.page_source[-1500:]}"
        time.sleep(0.05)


def judge_one(driver, item: int, outcome: str, by_key: bool) -> bool:
    """Give `outcome` to prompt `item` with a key or a button; whether A was shown first."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    wait_for(driver, lambda: driver.find_element(By.ID, "prompt").text == QUESTIONS[item], f"prompt {item}")
    assert driver.find_element(By.ID, "progress").text.startswith(f"Prompt {item + 1} of 5")
    assert "first file" in driver.page_source and "lima" not in driver.page_source.lower()  # names hidden
    a_first = a_is_first(driver, item)
    choice = choice_for(outcome, a_first)
    if by_key:  # both spellings of each key
        keys = {"first": ("1", Keys.ARROW_LEFT), "tie": ("0", "t"), "second": ("2", Keys.ARROW_RIGHT)}[choice]
        driver.find_element(By.TAG_NAME, "body").send_keys(keys[item % 2])
    else:
        driver.find_element(By.ID, choice).click()
    return a_first


def start_as(driver, url: str, name: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    driver.find_element(By.ID, "annotator").send_keys(name, Keys.ENTER)


def answers_files(folder) -> tuple[str, str]:
    """A's file, and the baseline's with the same prompts in reverse order (paired by prompt, not line)."""
    a_path = write_jsonl(folder / "lima.jsonl", [{"line": i + 1, "conversations": [q], "prompt": q, "answer": a}
                                                 for i, (q, a) in enumerate(zip(QUESTIONS, A_ANSWERS))])
    b_path = write_jsonl(folder / "gpt4.jsonl", [{"line": i + 1, "conversations": [q], "prompt": q, "answer": b}
                                                 for i, (q, b) in enumerate(zip(QUESTIONS, B_ANSWERS))][::-1])
    return a_path, b_path


def test_tie_discounted_agreement_by_hand():
    x = {0: "win", 1: "tie", 2: "loss", 3: "tie", 7: "win"}
    y = {0: "win", 1: "loss", 2: "win", 3: "tie", 5: "loss"}  # 1 + 0.5 + 0 + 1 over the 4 shared prompts
    assert pair_agreement(x, y) == {"prompts": 4, "points": 2.5, "accuracy": 0.625}
    assert pair_agreement(x, {9: "win"})["accuracy"] is None


def test_verdicts_once_each_a_torn_line_dropped_and_other_files_refused(tmp_path):
    a_path, b_path = answers_files(tmp_path)
    out = tmp_path / "human"
    annotation = Annotation(a_path, b_path, str(out), seed="s")
    shown = annotation.shown("ann", 2)
    a_first = shown.first == A_ANSWERS[2]
    assert {shown.first, shown.second} == {A_ANSWERS[2], B_ANSWERS[2]} and shown.turns == (QUESTIONS[2],)
    row = annotation.record("ann", 2, "first")
    assert row["outcome"] == ("win" if a_first else "loss") and row["baseline"] == f"{b_path}:3"
    assert annotation.record("ann", 2, "second") is None  # a form sent twice: the first verdict counts
    assert annotation.record("ann", 0, "tie")["outcome"] == "tie"
    assert annotation.next_item("ann") == 1 and annotation.next_item("bob") == 0
    with pytest.raises(ValueError, match="annotator name"):
        annotation.record("a b", 1, "tie")
    with open(out / "human.jsonl", "a") as f:
        f.write('{"annotator": "ann", "it')  # killed mid-line
    again = Annotation(a_path, b_path, str(out))  # the seed from session.json
    assert again.progress() == {"ann": 2} and again.shown("ann", 2) == shown
    again.record("ann", 1, "tie")
    assert len((out / "human.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ConfigError, match="seed"):
        Annotation(a_path, b_path, str(out), seed="other")
    other = write_jsonl(tmp_path / "other.jsonl", [{"conversations": [q], "answer": "x"} for q in QUESTIONS])
    with pytest.raises(ConfigError, match="not on other.jsonl vs gpt4.jsonl"):
        Annotation(other, b_path, str(out))
    write_jsonl(tmp_path / "lima.jsonl", [{"conversations": [q], "answer": "new"} for q in QUESTIONS])  # regenerated
    with pytest.raises(ConfigError, match="names, prompts and answers must be the same"):
        Annotation(a_path, b_path, str(out))


def test_two_annotators_restart_and_agreement(browser, tmp_path):
    from selenium.webdriver.common.by import By

    a_path, b_path = answers_files(tmp_path)
    out = tmp_path / "human"
    server = Server(["--answers", a_path, "--baseline", b_path, "--out", str(out), "--seed", "test"],
                    tmp_path / "annotate.log")
    server.start()
    shown = {}  # (annotator, item) -> A shown first
    try:
        start_as(browser, server.url, "ann")  # the keys, for 3 prompts
        for item in range(3):
            shown["ann", item] = judge_one(browser, item, ANN[item], by_key=True)
        wait_for(browser, lambda: browser.find_element(By.ID, "prompt").text == QUESTIONS[3], "the 4th prompt")
        server.stop()
        server.start()
        browser.get(server.url)  # a new visit: the name again, resumed at the 4th prompt
        start_as(browser, server.url, "ann")
        for item in range(3, 5):
            shown["ann", item] = judge_one(browser, item, ANN[item], by_key=True)
        wait_for(browser, lambda: browser.find_elements(By.ID, "done"), "the end page")

        start_as(browser, server.url, "bob")  # the buttons
        for item in range(5):
            shown["bob", item] = judge_one(browser, item, BOB[item], by_key=False)
        wait_for(browser, lambda: browser.find_elements(By.ID, "done"), "bob's end page")
        browser.get(server.url)
        assert "ann 5/5, bob 5/5" in browser.find_element(By.TAG_NAME, "body").text
    finally:
        server.stop()

    for name in ("ann", "bob"):  # random per prompt: both orders occur for each annotator ...
        assert {shown[name, i] for i in range(5)} == {True, False}
    assert any(shown["ann", i] != shown["bob", i] for i in range(5))  # ... and per annotator
    rows = [json.loads(line) for line in (out / "human.jsonl").read_text().splitlines()]
    assert [(r["annotator"], r["item"]) for r in rows] == [("ann", i) for i in range(5)] + [("bob", i) for i in range(5)]
    assert [r["outcome"] for r in rows] == ANN + BOB  # A's verdicts, whatever side A was on
    assert [r["shown_first"] == "answers" for r in rows] == [shown[r["annotator"], r["item"]] for r in rows]

    judged = tmp_path / "judged"  # a pairwise judge run's files, written by hand
    judged.mkdir()
    write_jsonl(judged / "verdicts.jsonl",
                [{"ours": f"{a_path}:{i + 1}", "baseline": f"{b_path}:{5 - i}", "prompt": q, "outcome": o}
                 for i, (q, o) in enumerate(zip(QUESTIONS, JUDGE))])
    (judged / "summary.json").write_text(json.dumps({"answers": a_path, "baseline": b_path}))
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "judge.py"), "agreement", "--human", str(out),
                           "--judge", str(judged)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "summary.json").read_text())
    figures = {"ann-bob": result["between_annotators"]["pooled"]["accuracy"],
               **{f"judge-{p['annotator']}": p["accuracy"] for p in result["judge_and_humans"]["annotators"]},
               "judge-pooled": result["judge_and_humans"]["pooled"]["accuracy"]}
    assert figures == pytest.approx(EXPECTED)
    assert "| ann and bob | 5 | 60.0% |" in done.stdout and "| **judge and humans, pooled** | 10 | 60.0% |" in done.stdout

    flipped = tmp_path / "flipped"  # the judge asked about B against A: the same agreement
    flipped.mkdir()
    swap = {"win": "loss", "loss": "win", "tie": "tie"}
    write_jsonl(flipped / "verdicts.jsonl", [{"ours": f"{b_path}:{5 - i}", "baseline": f"{a_path}:{i + 1}", "prompt": q,
                                              "outcome": swap[o]} for i, (q, o) in enumerate(zip(QUESTIONS, JUDGE))])
    (flipped / "summary.json").write_text(json.dumps({"answers": b_path, "baseline": a_path}))
    assert agreement(str(out), str(flipped))["judge_and_humans"]["pooled"]["accuracy"] == pytest.approx(0.6)
