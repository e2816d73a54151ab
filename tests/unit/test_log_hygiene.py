"""A ``tb`` command run in-process leaves no root log handler behind on a closed stream
(``tests/conftest.py``'s ``_root_log_handlers``): the two tests run in this order, in one process
(as in one pytest-xdist worker: ``make test`` hands out whole files)."""

from __future__ import annotations

import logging


def test_a_tb_command_in_process_under_capsys(capsys, tb_exit_code, tmp_path) -> None:
    code = tb_exit_code(["serve", "--port", "0", "--no-search", "--data-dir", str(tmp_path)])
    assert code == 2  # no checkpoint there: a user error, after main set up its logging
    assert "checkpoint" in capsys.readouterr().err
    assert any(type(h) is logging.StreamHandler for h in logging.getLogger().handlers)


def test_the_next_test_logs_without_a_logging_error(capsys) -> None:
    logging.getLogger("tb_reranker.tests").warning("a record after an in-process tb command")
    assert "Logging error" not in capsys.readouterr().err
