"""`flowtok-fast serve` arguments: usage errors exit 2 with one line; missing weights and a CPU
--mode graph are UserErrors (the CLI boundary prints them as one line) before anything listens."""
from __future__ import annotations

import pytest

import socket

from flowtok_fast.errors import UserError
from flowtok_fast.serve import main as serve_main
from flowtok_fast.serve.main import main


@pytest.mark.parametrize("argv,expected", [
    (["--buckets", "1,x"], "--buckets"), (["--buckets", "0,4"], "--buckets"), (["--max-wait-ms", "nan"], "--max-wait-ms"),
    (["--max-queue", "0"], "--max-queue"), (["--mode", "turbo"], "--mode"), (["--port", "http"], "--port"),
    (["--port", "70000"], "--port"), (["--port", "-1"], "--port"), (["--port", "0"], "--port"),
    (["--dtype", "fp16"], "--dtype"), (["--body-timeout-s", "0"], "--body-timeout-s"),
])
def test_bad_option_is_a_one_line_usage_error(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("flowtok-fast serve: error:") and expected in err and err.count("\n") == 1


def test_no_weights_and_graph_mode_on_cpu_are_user_errors():
    with pytest.raises(UserError, match="--model-dir"):
        main([])
    with pytest.raises(UserError, match="--mode graph needs a CUDA device"):
        main(["--random-weights", "--mode", "graph", "--device", "cpu"])


def test_bad_host_and_a_port_in_use_are_one_line_exit_2_before_the_model_loads(monkeypatch, capsys):
    monkeypatch.setattr(serve_main, "load_engine", lambda args: pytest.fail("the model loaded before the bind check"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for argv, expected in ((["--host", "999.1.1.1"], "--host 999.1.1.1"),
                               (["--host", "127.0.0.1", "--port", str(port)], "already in use")):
            with pytest.raises(SystemExit) as exit_info:
                main(["--random-weights", *argv])
            assert exit_info.value.code == 2
            err = capsys.readouterr().err
            assert err.startswith("flowtok-fast serve: error:") and expected in err and err.count("\n") == 1, err
