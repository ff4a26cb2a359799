"""tools.start_time: `kvloom serve` started as a user starts it, timed to /ready, with the engine's phases."""

import re

import pytest

from kvloom.tools import start_time
from tests.conftest import _JAX_CACHE

pytestmark = pytest.mark.timeout(420)

TINY = ["--max-running", "4", "--max-model-len", "256", "--page-size", "4", "--num-pages", "512",
        "--chunk-size", "32", "--max-tokens-per-step", "64", "--max-prefill-seqs", "2"]


def test_one_start_is_timed_with_its_phases(tiny_llama, capsys):
    assert start_time.main(["--runs", "1", "--", "--model", tiny_llama, *TINY,
                            "--compile-cache", _JAX_CACHE]) == 0
    out = capsys.readouterr().out
    line = re.search(r"^run 1: /ready after ([\d.]+)s \(engine start ([\d.]+)s: load_model [\d.]+s, "
                     r"tokenizer [\d.]+s, warmup [\d.]+s, round_trip [\d.]+s; executables (\d+) loaded, "
                     r"(\d+) compiled\)$", out, re.M)
    assert line, out
    assert float(line[1]) >= float(line[2]) > 0  # the process's time to /ready includes the engine's start
    assert int(line[3]) + int(line[4]) > 0
    assert "detail: tokenizer_load_s" in out


def test_a_server_that_cannot_start_is_a_failed_run(capsys):
    assert start_time.main(["--runs", "1", "--", "--model", "/nonexistent/model"]) == 1
    assert "run 1: failed" in capsys.readouterr().err
