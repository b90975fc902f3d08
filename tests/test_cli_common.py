"""``ttsr.cli.common.run_cli``: the ``main`` every ttsr CLI shares (parse, run, report)."""

from __future__ import annotations

import argparse

import pytest
from inference_helpers import assert_bad_input

from ttsr.cli.common import EXIT_BAD_INPUT, add_debug_argument, run_cli
from ttsr.imaging import InputError


def parser() -> argparse.ArgumentParser:
    built = argparse.ArgumentParser(prog="ttsr-test")
    built.add_argument("--fail", action="store_true")
    add_debug_argument(built)
    return built


def body(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.fail:
        raise InputError("x.png: no such file")
    return 7


def test_run_cli_parses_and_returns_the_body_exit_code() -> None:
    assert run_cli("ttsr-test", parser(), body, []) == 7


def test_run_cli_reports_bad_input_in_one_line_with_exit_2(capsys) -> None:
    code = run_cli("ttsr-test", parser(), body, ["--fail"])
    assert code == EXIT_BAD_INPUT
    assert_bad_input(code, capsys.readouterr().err, "ttsr-test", "x.png: no such file")


def test_run_cli_with_debug_shows_the_traceback() -> None:
    with pytest.raises(InputError, match="no such file"):
        run_cli("ttsr-test", parser(), body, ["--fail", "--debug"])
