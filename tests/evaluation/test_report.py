"""`opd report`: the page has its sections, and the KL colouring is the logged per-token values."""

import json
import re
from html.parser import HTMLParser

from typer.testing import CliRunner

from opd.cli.main import app
from opd.loop import train
from opd.report import KL_SCALE, kl_colour


class TokenSpans(HTMLParser):
    """Collects (data-kl, style, text) of every token span, per completion block."""

    def __init__(self):
        super().__init__()
        self.completions, self._span = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("class") == "completion":
            self.completions.append({"file": attrs["data-file"], "index": int(attrs["data-index"]), "tokens": []})
        if tag == "span" and attrs.get("class") == "tok":
            self._span = [float(attrs["data-kl"]), attrs["style"], ""]

    def handle_data(self, data):
        if self._span is not None:
            self._span[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._span is not None:
            self.completions[-1]["tokens"].append(tuple(self._span))
            self._span = None


def test_report_colours_tokens_by_their_logged_kl(tiny_config, tmp_path):
    run = tmp_path / "run"
    train(tiny_config("train.steps=4", "eval.every=2", "log.rollouts_every=2", run_dir=run))
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "report.html").read_text()
    for section in ('id="evaluation"', 'id="curves"', 'id="rollouts"', "teacher_kl_vs_step.png"):
        assert section in page
    assert (run / "teacher_kl_vs_step.png").stat().st_size > 1000

    parser = TokenSpans()
    parser.feed(page)
    assert parser.completions
    for block in parser.completions:
        record = [json.loads(line) for line in (run / "rollouts" / block["file"]).read_text().splitlines()][block["index"]]
        assert [kl for kl, _, _ in block["tokens"]] == record["teacher_kl"]  # exactly the logged values
        assert [text for _, _, text in block["tokens"]] == record["tokens"]
        for kl, style, _ in block["tokens"]:
            assert f"background:{kl_colour(kl)}" in style


def test_colour_scale_is_white_to_red():
    assert kl_colour(-1.0) == kl_colour(0.0) == "rgb(255,255,255)"
    assert kl_colour(KL_SCALE) == kl_colour(10 * KL_SCALE) == "rgb(255,0,0)"
    greens = [int(re.findall(r"\d+", kl_colour(k))[1]) for k in (0.5, 1.0, 2.0, 3.0)]
    assert greens == sorted(greens, reverse=True)  # more KL, redder


def test_report_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output
