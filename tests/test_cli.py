"""The `herd` command line: every command has --help; generate and chat work on a checkpoint; errors are one line."""

import argparse
import subprocess
import sys

import pytest

from llamaherd.checkpoint import save
from llamaherd.cli import SUBCOMMANDS, build_parser, main
from llamaherd.generation import generate


def all_commands(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words = {v: k for k, v in SUBCOMMANDS.items()}.get(name, (*prefix, name))  # `herd eval code`
                yield words
                yield from all_commands(sub, words)


def test_every_command_has_help(capsys):
    commands = list(all_commands(build_parser()))
    assert {("run",), ("pretrain",), ("recipes",), ("generate",), ("chat",), ("convert",), ("info",),
            ("tokenizer", "train"), ("data", "pack"), ("eval",), ("eval", "code"),
            ("eval", "pairwise"), ("guard",), ("guard", "prompt"), ("guard", "train"),
            ("cyberseceval",), ("codeshield",), ("scaling",), ("scaling", "sweep"), ("scaling", "fit"),
            ("scaling", "optimal"), ("scaling", "predict-task"), ("scaling", "task-points")} <= set(commands)
    for cmd in commands:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage: herd " + " ".join(cmd) in capsys.readouterr().out


@pytest.fixture
def checkpoint(tmp_path, make_tiny_model, small_tokenizer):
    model = make_tiny_model(seed=1, max_seq_len=512)
    path = save(model, tmp_path / "ckpt", layout="herd", tokenizer=small_tokenizer)
    return path, model, small_tokenizer


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("extra", [[], ["--compile"]])
def test_generate_prints_the_greedy_completion(capsys, checkpoint, extra):
    path, model, tok = checkpoint
    ids = tok.encode("the cat", bos=True)
    want = generate(model, [ids], max_new_tokens=12, stop_tokens=tok.stop_tokens)[0]
    want_text = tok.decode([t for t in want if t not in tok.stop_tokens])
    argv = ["generate", str(path), "--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "12", *extra]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == want_text + "\n"
    assert ("compiling the decode step" in err) == ("--compile" in extra)


@pytest.mark.usefixtures("one_thread")
def test_chat_answers_each_turn_in_the_chat_format(monkeypatch, capsys, checkpoint):
    import io

    from llamaherd.tokenizer import ChatFormat

    path, model, tok = checkpoint
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nand again\n"))
    assert main(["chat", str(path), "--system", "be brief", "--temperature", "0", "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    chat = ChatFormat(tok)
    dialog = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    first = generate(model, [chat.encode_dialog_prompt(dialog)], max_new_tokens=6, stop_tokens=tok.stop_tokens)[0]
    assert lines[0] == tok.decode([t for t in first if t not in tok.stop_tokens])


def test_generate_errors_are_one_line(capsys, tmp_path, checkpoint):
    code = main(["generate", str(tmp_path / "nope"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "nope" in err
    path, model, _ = checkpoint
    no_tok = save(model, tmp_path / "no-tok", layout="herd")
    code = main(["generate", str(no_tok), "--prompt", "x"])
    assert code == 2 and "no tokenizer" in capsys.readouterr().err
    code = main(["generate", str(path), "--prompt", "x" * 600, "--temperature", "0"])
    assert code == 2 and "does not fit the context" in capsys.readouterr().err


def test_unknown_arguments_and_no_traceback_from_the_real_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llamaherd.cli", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "llamaherd.cli", "generate", "x", "--prompt", "y", "--bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr
