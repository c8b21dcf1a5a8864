"""--compile's decoding: one static cache per decoder, one compilation of the step for every call, chat turn and
evaluation batch, and the eager decoder's tokens; the tokens read by the host a step late change nothing.

Compilations are counted by torch._dynamo itself: counters["stats"]["unique_graphs"] (graphs it captured, any
backend) and, per compiled function, its cache entries (one per compiled variant; a recompile adds one). The first
test compiles with inductor as --compile does (~30 s on a CPU); the others use a counting backend that runs the
captured graph eagerly (torch._dynamo.testing.CompileCounter): dynamo captures, guards and recompiles the same way,
only the code generation is skipped.
"""

import functools
import json

import pytest
import torch
from hf_reference import HF_IMAGE_ID, reference_and_ours
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import evaluate
import generate
from data import IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return reference_and_ours(tmp_path_factory.mktemp("ref"))


def batch_of(n, lengths, n_image_tokens, seed):
    """n prompts of the given text lengths, every other one with an image, and their images."""
    g = torch.Generator().manual_seed(seed)
    prompts, images = [], 0
    for i in range(n):
        text = torch.randint(3, HF_IMAGE_ID, (lengths[i],), generator=g).tolist()
        image = [IMAGE_TOKEN_INDEX] * n_image_tokens if i % 2 else []
        prompts.append([1] + image + text)
        images += bool(image)
    return prompts, torch.randn(images, 3, 16, 16, generator=g) if images else None


# (batch size, text lengths, new tokens): prompts of 3 to 40 tokens, batches of 1 to 3, answers of 5 to 20 tokens
CALLS = [(3, [5, 9, 2], 12), (1, [30], 20), (2, [3, 17], 8), (3, [40, 1, 11], 5), (1, [7], 16)]


def test_the_compiled_step_compiles_once_for_calls_of_any_length_and_batch(models):
    """Inductor, as --compile runs it: five calls of different prompt lengths, batch sizes and answer lengths, one
    decoder; the tokens are the eager DynamicCache's; the cache is allocated once; the step compiles once."""
    _, ours = models
    static = generate.StaticDecoder(ours, batch=3)
    graphs, caches = counters["stats"]["unique_graphs"], set()
    for n, (size, lengths, new_tokens) in enumerate(CALLS):
        prompts, pixel_values = batch_of(size, lengths, ours.num_image_tokens, seed=n)
        eager = generate.generate(ours, prompts, pixel_values, max_new_tokens=new_tokens)
        assert generate.generate(ours, prompts, pixel_values, max_new_tokens=new_tokens, decoder=static) == eager
        assert sum(map(len, eager)) >= size * new_tokens // 2  # answers long enough to mean something
        caches.add(id(static.cache))
    assert len(caches) == 1 and static.cache.layers[0].keys.shape[0] == 3
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one graph: no graph break, no recompile
    assert len(_debug_get_cache_entry_list(static.token_logits.__func__.__code__)) == 1


def test_a_larger_call_grows_the_cache_and_compiles_once_more(models, monkeypatch):
    """The one thing that compiles again: a call that needs more rows or positions than the cache has. It grows (the
    length to a power of two), and calls as large or smaller reuse it. (The smallest cache, 256 positions, is the tiny
    LLM's whole context: it is made smaller here to see it grow.)"""
    _, ours = models
    monkeypatch.setattr(generate.StaticDecoder, "MIN_LENGTH", 16)
    count = CompileCounter()
    static = generate.StaticDecoder(ours, compile=count)
    for size, lengths, new_tokens in [(1, [5], 10), (1, [9], 6), (1, [3], 40), (2, [4, 8], 10), (2, [6, 2], 4)]:
        prompts, pixel_values = batch_of(size, lengths, ours.num_image_tokens, seed=size)
        assert generate.generate(ours, prompts, pixel_values, max_new_tokens=new_tokens, decoder=static) == \
            generate.generate(ours, prompts, pixel_values, max_new_tokens=new_tokens)
    assert static.cache.layers[0].keys.shape[:3] == (2, ours.language_model.config.num_key_value_heads, 64)
    assert count.frame_count == 3  # 1 row x 16 positions; 1 x 64 (a longer answer); 2 x 64 (a batch of two)


def test_sampling_with_the_static_cache_equals_the_dynamic_cache(models):
    _, ours = models
    static = generate.StaticDecoder(ours, compile=CompileCounter(), batch=3)
    for n, (size, lengths, new_tokens) in enumerate(CALLS[:3]):
        prompts, pixel_values = batch_of(size, lengths, ours.num_image_tokens, seed=10 + n)
        kw = dict(max_new_tokens=new_tokens, temperature=1.0, top_k=20, top_p=0.9, seed=n)
        assert generate.generate(ours, prompts, pixel_values, decoder=static, **kw) == \
            generate.generate(ours, prompts, pixel_values, **kw)


@pytest.mark.parametrize("lag", [1, 3])
def test_tokens_read_steps_late_change_nothing(models, llama_tok, monkeypatch, lag):
    """On a GPU the host reads each step's tokens one step late (generate.TokensToHost); here the same bookkeeping
    runs on a CPU with a lag of 1 and 3: the same tokens, EOS and stop strings honoured at the same place, the same
    tokens streamed in the same order."""
    _, ours = models
    prompts, pixel_values = batch_of(3, [5, 9, 2], ours.num_image_tokens, seed=4)

    def run(**kw):
        streamed = []
        out = generate.generate(ours, prompts, pixel_values, max_new_tokens=14, tokenizer=llama_tok,
                                on_token=lambda i, t: streamed.append((i, t)), **kw)
        return out, streamed

    full, _ = run()
    eos = full[0][3]  # a token row 0 writes at step 4 ends it; a character row 1 writes is a stop string
    stop = next(s for s in map(llama_tok.decode, ([t] for t in full[1][4:])) if s.strip())
    for kw in (dict(), dict(eos_ids={eos}), dict(stop_strings=(stop,)),
               dict(eos_ids={eos}, decoder=generate.StaticDecoder(ours, compile=False, batch=3))):
        expected = run(**kw)
        monkeypatch.setattr(generate, "TokensToHost", functools.partial(generate.TokensToHost, lag=lag))
        assert run(**kw) == expected
        monkeypatch.undo()
    assert len(run(eos_ids={eos})[0][0]) == 3


# ----------------------------------------------------------------------------------------------------------------------
# The command lines: --chat and evaluate.py run, with --compile


@pytest.fixture
def counted(monkeypatch):
    """generate.StaticDecoder as --compile builds it, compiling with a counting backend; the decoders built."""
    built, cls = [], generate.StaticDecoder

    class Counted(cls):
        def __init__(self, model, **kw):
            self.count = CompileCounter()
            super().__init__(model, compile=self.count, **kw)
            built.append(self)

    monkeypatch.setattr(generate, "StaticDecoder", Counted)
    return built


def test_chat_turns_of_growing_length_compile_once(colour_checkpoint, counted, capsys, keyboard):
    turns = ["What is this?", "And what color is the left side of it, exactly?", "Why?",
             f"/image {colour_checkpoint / '1.png'}", "Describe the whole picture in detail, please.", "/reset", "Hi."]
    argv = ["--model", str(colour_checkpoint / "model"), "--image", str(colour_checkpoint / "0.png"), "--chat",
            "--temperature", "0", "--max-new-tokens", "6"]
    out = {}
    for flags in ([], ["--compile"]):
        keyboard(turns)
        generate.main(argv + flags)
        out[bool(flags)] = capsys.readouterr().out
    assert out[True] == out[False] and out[True].count("ASSISTANT: ") == 5
    (decoder,) = counted
    assert decoder.count.frame_count == 1  # the cache holds the whole context from the first turn
    assert decoder.cache.layers[0].keys.shape[2] == decoder.llm.config.max_position_embeddings


def test_evaluate_run_compile_gives_the_eager_answers(colour_checkpoint, counted, tmp_path):
    """One decoder for the run, batches of 4 (the last one of 2 runs in the cache's first rows), one compilation."""
    questions = tmp_path / "q.jsonl"
    rows = [{"question_id": i, "image": f"{i}.png", "text": "What color is it?" + " Look again." * i}
            for i in range(5)] + [{"question_id": 9, "text": "Name a shape."}]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["run", "--model", str(colour_checkpoint / "model"), "--questions", str(questions), "--image-folder",
            str(colour_checkpoint), "--batch-size", "4", "--max-new-tokens", "8"]
    answers = {}
    for flags in ([], ["--compile"]):
        path = tmp_path / f"answers{len(flags)}.jsonl"
        evaluate.main(argv + flags + ["--answers", str(path)])
        answers[bool(flags)] = [(a["question_id"], a["text"]) for a in map(json.loads, open(path))]
    assert answers[True] == answers[False] and len(answers[True]) == 6
    (decoder,) = counted
    assert decoder.count.frame_count == 1 and decoder.cache.layers[0].keys.shape[0] == 4
