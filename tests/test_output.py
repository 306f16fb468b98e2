"""output.py and the process-level promises: stdout is data, closed pipes and full disks end cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_image, run_idefics

from idefics_cli import Model
from idefics_cli.errors import ExitStatus, IdeficsError
from idefics_cli.output import Output, run

FAST = ["--quant", "none", "--max-new-tokens", "4"]


def test_run_maps_errors_to_exit_status_and_one_line(capsys):
    out = Output()
    assert run(lambda: 0, out) == 0
    assert run(lambda: (_ for _ in ()).throw(IdeficsError("corrupt", "bad xref", path="a.pdf")), out) == 4
    assert capsys.readouterr().err.strip() == "error [corrupt]: a.pdf: bad xref"

    def boom():
        raise ValueError("unexpected\nsecond line")

    assert run(boom, out) == ExitStatus.INTERNAL
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error [internal]: ValueError: unexpected" in err and "Traceback" not in err

    def interrupted():
        raise KeyboardInterrupt

    assert run(interrupted, out) == 130


def test_piped_stderr_lines_are_never_wrapped(capsys):
    out = Output()
    long = "a/" * 90 + "scan.pdf page 3: repaired (the file is damaged and was repaired to be read)"
    out.warn(long)
    out.console.print("  failed: " + long, markup=False, style="red")
    assert capsys.readouterr().err.splitlines() == [f"warning: {long}", f"  failed: {long}"]


def test_piped_warnings_and_errors_are_the_lines_rich_would_print(capsys):
    """Written without Rich on a piped stderr: the text Rich prints there, control codes stripped as Rich does."""
    name = "odd\r\aname\b.pdf"
    plain = Output()
    plain.warn(f"{name} page 2: blank")
    plain.error(IdeficsError("corrupt", f"{name}: bad xref"))
    assert plain._console is None
    rich_out = Output()
    rich_out.console.print(f"warning: {name} page 2: blank", style="yellow", markup=False)
    rich_out.console.print(IdeficsError("corrupt", f"{name}: bad xref").one_line(), markup=False, soft_wrap=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == lines[2:] == ["warning: oddname.pdf page 2: blank", "error [corrupt]: oddname.pdf: bad xref"]


def test_python_warnings_stay_off_stderr_unless_debugging():
    script = ("import sys, warnings\nfrom idefics_cli.output import run\n"
              "def body():\n    warnings.warn('Corrupt EXIF data', UserWarning)\n    return 0\n"
              "sys.exit(run(body))\n")
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert quiet.returncode == 0 and quiet.stderr == b""
    debug = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60,
                           env={**os.environ, "IDEFICS_DEBUG": "1"})
    assert b"UserWarning: Corrupt EXIF data" in debug.stderr


def test_stdout_closed_early_ends_quietly(tiny_model, tmp_path):
    image = tmp_path / "p.png"
    make_image().save(image)
    cmd = (f"{sys.executable} -m idefics_cli ask {image} {image} {image} 'q' --each-page --model {tiny_model} "
           f"--quant none --max-new-tokens 30 | head -c 5")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.stdout == b"==> /"
    assert b"Traceback" not in result.stderr and b"Exception ignored" not in result.stderr
    assert result.returncode == 0, result.stderr


def test_full_disk_on_stdout_is_a_clear_error(tiny_model, tmp_path):
    image = tmp_path / "p.png"
    make_image().save(image)
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "idefics_cli", "ask", str(image), "q", "--model", tiny_model,
                                 *FAST], stdout=full, stderr=subprocess.PIPE, timeout=300,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 4 and lines == ["error [output_error]: cannot write to stdout: No space left on device"]


def test_a_closed_stdout_or_stderr_is_a_clear_error(tiny_model, tmp_path):
    """stdout closed (`>&-`): `sys.stdout` is None and every command died with a traceback before it began; the
    work is done and writing its result is the one output_error line. stderr closed: an error exited 1, not its own
    status."""
    image = tmp_path / "p.png"
    make_image(80, 60).save(image)
    sheet = tmp_path / "s.png"
    result = subprocess.run([sys.executable, "-m", "idefics_cli", "crops", str(image), "--out", str(sheet), "--model",
                             tiny_model], capture_output=True, timeout=300, preexec_fn=lambda: os.close(1),
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 4 and lines == ["error [output_error]: cannot write to stdout: it is closed"], lines
    assert sheet.stat().st_size > 0
    result = subprocess.run([sys.executable, "-m", "idefics_cli", "crops", str(tmp_path / "missing.png"), "--model",
                             tiny_model], capture_output=True, timeout=300, preexec_fn=lambda: os.close(2),
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 4 and result.stdout == b""  # stderr closed: the error's status all the same (was 1)


def test_offline_makes_no_network_connection(tiny_model, tmp_path):
    """Every socket connect fails loudly in the child; --offline must never try one."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import socket, sys\n"
        "def _refuse(self, *a, **k):\n"
        "    sys.stderr.write('NETWORK ATTEMPT\\n')\n"
        "    raise OSError('network disabled by test')\n"
        "socket.socket.connect = _refuse\nsocket.socket.connect_ex = _refuse\n"
        "socket.create_connection = lambda *a, **k: _refuse(None)\n")
    image = tmp_path / "p.png"
    make_image().save(image)
    env = {"PYTHONPATH": str(guard), "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "cache")}
    local = run_idefics("ask", image, "q", "--json", "--offline", "--model", tiny_model, *FAST, env=env)
    assert local.returncode == 0 and b"NETWORK ATTEMPT" not in local.stderr, local.stderr[-2000:]
    assert json.loads(local.stdout)["usage"]["image_tokens"] == 320
    hub = run_idefics("ask", image, "q", "--offline", "--model", "HuggingFaceM4/idefics2-8b", *FAST, env=env)
    assert hub.returncode == 5 and b"NETWORK ATTEMPT" not in hub.stderr
    assert hub.stderr.decode().strip().startswith("error [model_error]")


def test_stream_writes_pieces_and_a_stop_while_writing_stops_the_answer(engine, tmp_path, capsys, monkeypatch):
    """`Output.stream`: the pieces, then a newline; Ctrl-C while a piece is written (not only while waiting for
    the next) stops generating and keeps what was read, marked interrupted (chat commits it so)."""
    image = tmp_path / "p.png"
    make_image(seed=3).save(image)
    out = Output()
    answer = Model(engine).ask([str(image)], "What is it?", max_new_tokens=4)
    out.stream(answer)
    captured = capsys.readouterr()
    assert captured.out == answer.text + "\n"
    assert captured.err == "warning: the answer was cut at --max-new-tokens 4; raise it for the whole answer\n"

    long = Model(engine).ask([str(image)], "What is it?", max_new_tokens=300)
    written = []

    def write(text):
        written.append(text)
        if len(written) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(out, "write", write)
    try:
        out.stream(long)
    except KeyboardInterrupt:
        pass
    assert long.interrupted and long.done and long.text == "".join(written) and long.finish_reason is None


def test_ctrl_c_after_a_piece_is_kept_but_before_it_is_shown_still_shows_it(engine, tmp_path, capsys):
    """Ctrl-C that lands after the answer kept a piece and before the terminal got it: the piece is written, so
    what chat keeps of the interrupted answer is what the screen shows."""
    image = tmp_path / "p.png"
    make_image(seed=3).save(image)
    answer = Model(engine).ask([str(image)], "What is it?", max_new_tokens=300)

    class Kept(list):  # the answer's own list of pieces: Ctrl-C lands just after the third is kept
        def append(self, piece):
            super().append(piece)
            if len(self) == 3:
                raise KeyboardInterrupt

    answer._pieces = Kept()
    with pytest.raises(KeyboardInterrupt):
        Output().stream(answer)
    assert answer.interrupted and len(answer.text) > 0 and capsys.readouterr().out == answer.text



def test_a_warning_about_a_file_with_a_newline_in_its_name_is_one_stderr_line(tiny_model, tmp_path):
    """`ask --each-page` on `new<LF>line.png`: the "answer was cut" warning carried the name as it is, two stderr
    lines where a warning is one (the page warnings and errors already put a space for it)."""
    image = tmp_path / "new\nline.png"
    make_image().save(image)
    result = run_idefics("ask", image, "q", "--each-page", "--model", tiny_model, *FAST)
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode().splitlines() == [f"warning: {tmp_path}/new line.png page 1: the answer was cut at "
                                                   "--max-new-tokens 4; raise it for the whole answer"]
