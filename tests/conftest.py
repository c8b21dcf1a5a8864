"""Tiny models and tokenizers built offline from configs (tools/tiny.py), shared by the tests; no test touches the
network."""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from tools.tiny import chatml_tokenizer, llama_tokenizer, save_tiny_backbones, save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def llama_tok():
    return llama_tokenizer()


@pytest.fixture(scope="session")
def chatml_tok():
    return chatml_tokenizer()


@pytest.fixture(scope="session")
def backbones(tmp_path_factory, llama_tok):
    return save_tiny_backbones(str(tmp_path_factory.mktemp("backbones")), tokenizer=llama_tok)


@pytest.fixture(scope="session")
def colour_checkpoint(tmp_path_factory):
    """A tiny finetune.py-shaped checkpoint (root/model) and five one-colour pictures beside it (root/0.png ...
    4.png: red, blue, green, yellow, purple). Tests read it and never write into it."""
    from PIL import Image

    root = tmp_path_factory.mktemp("colour_ckpt")
    save_tiny_checkpoint(root)
    for i, color in enumerate(["red", "blue", "green", "yellow", "purple"]):
        Image.new("RGB", (24, 16), color).save(root / f"{i}.png")
    return root


@pytest.fixture
def keyboard(monkeypatch):
    """keyboard(lines): input() returns these lines one by one, then raises EOFError (Ctrl-D: a chat ends)."""
    def type_lines(lines):
        lines = iter(lines)

        def read(prompt=""):
            line = next(lines, None)
            if line is None:
                raise EOFError
            return line

        monkeypatch.setattr("builtins.input", read)
    return type_lines


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The toy world, small (test_train.py's flags() train in it): its replies differ a lot in length ("Yes." or a
    description), so ranks and micro-batches hold different numbers of supervised tokens, and some samples are
    text-only. Tests read it and never write into it."""
    from tools.toy_world import build_world

    root = tmp_path_factory.mktemp("world")
    return {**build_world(str(root), n_images=40, n_test=4, clip_steps=2, llm_steps=2), "root": root}


@pytest.fixture
def crash_on_second_answer(monkeypatch):
    """A function that makes generate.answer raise KeyboardInterrupt on its second call from then on, as a run stopped
    mid-way, and returns the function that gives generate.answer back (for the resumed run)."""
    import generate

    answer = generate.answer

    def start():
        calls = []

        def crash_on_second_batch(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return answer(*args, **kwargs)

        monkeypatch.setattr(generate, "answer", crash_on_second_batch)
        return lambda: monkeypatch.setattr(generate, "answer", answer)

    return start
