"""generate.py: greedy equals transformers' generate, batching and the KV cache change nothing, sampling is seeded
and restricted as asked, and the CLI answers, streams and refuses bad input clearly."""

import warnings

import pytest
import torch
from hf_reference import HF_IMAGE_ID, VOCAB, reference_and_ours
from PIL import Image

import checkpoints
import data
import generate
from data import IMAGE_TOKEN_INDEX
from model import LlavaConfig, LlavaModel
from tools.tiny import save_tiny_backbones, save_tiny_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return reference_and_ours(tmp_path_factory.mktemp("ref"))


def prompts(n_image_tokens, seed=0):
    """Three prompts of different lengths with 0, 1 and 2 images, as ChatFormat.prompt builds them."""
    g = torch.Generator().manual_seed(seed)
    text = lambda k: torch.randint(3, HF_IMAGE_ID, (k,), generator=g).tolist()  # noqa: E731
    image = [IMAGE_TOKEN_INDEX] * n_image_tokens
    return [[1] + text(6), [1] + text(2) + image + text(4), [1] + image + text(3) + image + text(1)], \
        torch.randn(3, 3, 16, 16, generator=g)


def test_greedy_equals_transformers_generate(models):
    hf, ours = models
    batch, pixel_values = prompts(ours.num_image_tokens)
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(p)) + [HF_IMAGE_ID if t == IMAGE_TOKEN_INDEX else t for t in p]
                        for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, max_new_tokens=12,
                           do_sample=False, eos_token_id=2, pad_token_id=0)[:, width:].tolist()
    got = generate.generate(ours, batch, pixel_values, max_new_tokens=12, eos_ids={2}, pad_id=0)
    assert got == [row[:row.index(2)] if 2 in row else row for row in expected]
    assert sum(map(len, got)) > 20  # sequences long enough to mean something


def test_each_sequence_of_a_batch_equals_generating_it_alone(models):
    _, ours = models
    batch, pixel_values = prompts(ours.num_image_tokens, seed=1)
    together = generate.generate(ours, batch, pixel_values, max_new_tokens=10)
    images = [pixel_values[:0], pixel_values[:1], pixel_values[1:]]
    alone = [generate.generate(ours, [p], im if len(im) else None, max_new_tokens=10)[0]
             for p, im in zip(batch, images)]
    assert together == alone


class Recompute:
    """The reference the KV caches must agree with: no cache, the whole sequence through the LLM at every step."""

    def __init__(self, model):
        self.llm = model.language_model

    def prefill(self, embeds, mask, length):
        self.embeds, self.mask = embeds, mask
        return self.logits()

    def step(self, token):
        self.embeds = torch.cat([self.embeds, self.llm.get_input_embeddings()(token[:, None])], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self.logits()

    def logits(self):
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        return self.llm(inputs_embeds=self.embeds, attention_mask=self.mask, position_ids=positions,
                        use_cache=False).logits[:, -1]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_equals_recomputing_every_step(models, temperature):
    _, ours = models
    batch, pixel_values = prompts(ours.num_image_tokens, seed=2)
    kw = dict(max_new_tokens=10, temperature=temperature, seed=7)
    assert generate.generate(ours, batch, pixel_values, **kw) == \
        generate.generate(ours, batch, pixel_values, decoder=Recompute(ours), **kw)


def test_static_cache_decoding_equals_the_dynamic_cache(models):
    """--compile's path (StaticCache, fixed-shape steps), run eagerly here (tests/test_speed_decode.py compiles it).
    One decoder for all calls, as the CLI holds it: its cache is reset in place, and a smaller batch runs in its first
    rows."""
    _, ours = models
    batch, pixel_values = prompts(ours.num_image_tokens, seed=6)
    static = generate.StaticDecoder(ours, compile=False)
    for kw in (dict(), dict(temperature=1.0, seed=3)):
        assert generate.generate(ours, batch, pixel_values, max_new_tokens=10, decoder=static, **kw) == \
            generate.generate(ours, batch, pixel_values, max_new_tokens=10, **kw)
    assert generate.generate(ours, batch[1:2], pixel_values[:1], max_new_tokens=10, decoder=static) == \
        generate.generate(ours, batch[1:2], pixel_values[:1], max_new_tokens=10)


@pytest.mark.parametrize("static", [False, True])
def test_generation_uses_no_deprecated_transformers_api(models, static):
    """transformers announces an API's removal with a FutureWarning or DeprecationWarning; here they are errors."""
    _, ours = models
    batch, pixel_values = prompts(ours.num_image_tokens, seed=7)
    decoder = generate.StaticDecoder(ours, compile=False) if static else generate.Decoder(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        generate.generate(ours, batch, pixel_values, max_new_tokens=3, decoder=decoder)


def test_sampling_is_reproducible_from_its_seed(models):
    _, ours = models
    batch, pixel_values = prompts(ours.num_image_tokens, seed=3)
    kw = dict(max_new_tokens=10, temperature=1.0)
    a = generate.generate(ours, batch, pixel_values, seed=1, **kw)
    assert a == generate.generate(ours, batch, pixel_values, seed=1, **kw)
    assert a != generate.generate(ours, batch, pixel_values, seed=2, **kw)


def test_each_sequence_stops_at_eos_on_its_own(models):
    _, ours = models
    batch, pixel_values = prompts(ours.num_image_tokens, seed=4)
    full = generate.generate(ours, batch, pixel_values, max_new_tokens=12)
    stop = full[0][3]  # make a token the first sequence writes at step 4 an end token
    cut = generate.generate(ours, batch, pixel_values, max_new_tokens=12, eos_ids={stop})
    assert cut == [row[:row.index(stop)] if stop in row else row for row in full]
    assert len(cut[0]) == full[0].index(stop) and max(map(len, cut)) == 12


DRAWS = 20000


def frequencies(logits, **kw):
    g = torch.Generator().manual_seed(0)
    draws = generate.next_tokens(logits.expand(DRAWS, -1), generator=g, **kw)
    return torch.bincount(draws, minlength=logits.shape[-1]).float() / DRAWS


def test_temperature_top_k_and_top_p_shape_the_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    p = logits.softmax(-1)[0]
    assert (frequencies(logits, temperature=1.0) - p).abs().max() < 0.015
    hot = (logits / 2.0).softmax(-1)[0]
    assert (frequencies(logits, temperature=2.0) - hot).abs().max() < 0.015
    top3 = frequencies(logits, temperature=1.0, top_k=3)
    assert top3[3:].sum() == 0 and (top3[:3] - p[:3] / p[:3].sum()).abs().max() < 0.015
    # the nucleus: the smallest set of most likely tokens whose mass reaches top_p (here the first two: 0.37 + 0.22)
    nucleus = frequencies(logits, temperature=1.0, top_p=0.5)
    assert nucleus[2:].sum() == 0 and (nucleus[:2] - p[:2] / p[:2].sum()).abs().max() < 0.015
    assert torch.equal(frequencies(logits, temperature=0.0), torch.eye(6)[0])


# ----------------------------------------------------------------------------------------------------------------------
# The command line, on a checkpoint saved like finetune.py saves one


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    save_tiny_checkpoint(root)
    Image.new("RGB", (30, 20), (200, 30, 30)).save(root / "red.png")
    (root / "corrupt.png").write_bytes(b"not a png")
    return root


def cli(capsys, *argv):
    generate.main(list(argv))
    return capsys.readouterr().out


def test_cli_answers_about_an_image(checkpoint, capsys):
    out = cli(capsys, "--model", str(checkpoint / "model"), "--image", str(checkpoint / "red.png"),
              "--temperature", "0", "--max-new-tokens", "6", "What color is it?")
    model, fmt, processor = generate.load(str(checkpoint / "model"))
    pixel_values = generate.prepare_images([str(checkpoint / "red.png")], processor, "pad")
    expected = generate.answer(model, fmt, [[{"role": "user", "content": "<image>\nWhat color is it?"}]],
                               pixel_values, max_new_tokens=6)[0]
    assert out == expected + "\n"


def test_chat_streams_and_loads_another_image(checkpoint, capsys, monkeypatch):
    lines = iter(["What is this?", "And now?", f"/image {checkpoint / 'red.png'}", "Again?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    out = cli(capsys, "--model", str(checkpoint / "model"), "--image", str(checkpoint / "red.png"), "--chat",
              "--temperature", "0", "--max-new-tokens", "4")
    assert out.count("ASSISTANT: ") == 3 and "(new conversation about" in out


def refused(capsys, argv):
    """generate.main(argv) stops as a command line does on bad input: status 2, the error on stderr, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        generate.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error: " in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("args,message", [
    (["--image", "{root}/missing.png", "Hi?"], "--image {root}/missing.png: no such file"),
    (["--image", "{root}", "Hi?"], "--image {root}: no such file"),  # a folder
    (["--image", "{root}/corrupt.png", "Hi?"], "--image: cannot read image {root}/corrupt.png"),
    (["  "], "empty prompt"),
    (["--chat", "Hi?"], "drop the question, or drop --chat"),
    (["word " * 400], "does not fit the LLM's context of 256"),
])
def test_cli_refuses_bad_input_clearly(checkpoint, args, message, capsys):
    argv = ["--model", str(checkpoint / "model")] + [a.format(root=checkpoint) for a in args]
    assert message.format(root=checkpoint) in refused(capsys, argv)


@pytest.mark.parametrize("flag,value", [
    ("--max-new-tokens", "0"), ("--max-new-tokens", "-3"), ("--max-new-tokens", "2.5"), ("--top-k", "0"),
    ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"), ("--temperature", "-0.1"), ("--temperature", "nan"),
    ("--temperature", "inf"), ("--seed", "-1"), ("--seed", str(2**64)),
])
def test_flags_out_of_range_are_refused_by_name(flag, value, capsys):
    assert f"argument {flag}: must be" in refused(capsys, ["--model", "nowhere", flag, value, "Hi?"])


def test_a_missing_image_is_said_before_the_model_loads(tmp_path, capsys):
    err = refused(capsys, ["--model", str(tmp_path / "no-model"), "--image", str(tmp_path / "missing.png"), "Hi?"])
    assert "--image" in err and "missing.png" in err


def test_chat_commands_check_their_image_and_refuse_what_they_do_not_know(checkpoint, capsys, monkeypatch,
                                                                           keyboard):
    """/image with a file that is not there says so at once and keeps the image; a line starting with / that is no
    command is not sent to the model; // sends a message starting with /; /reset forgets."""
    red = str(checkpoint / "red.png")
    keyboard(["What is this?", f"/image {checkpoint / 'missing.png'}", "/imagine a cat", "/image", "//etc/hosts?",
              f"/image {checkpoint / 'corrupt.png'}", "/reset", "Again?"])
    asked = []

    def answer(model, fmt, conversations, pixel_values, **kwargs):
        asked.append(([m["content"] for m in conversations[0]], None if pixel_values is None else len(pixel_values)))
        return ["fine"]

    monkeypatch.setattr(generate, "answer", answer)
    out = cli(capsys, "--model", str(checkpoint / "model"), "--image", red, "--chat")
    assert f"error: /image {checkpoint / 'missing.png'}: no such file; check the path (the conversation goes on " \
        f"about {red})" in out
    assert "unknown command /imagine; commands: /image PATH, /reset, /quit" in out
    assert "/image needs a PATH" in out and f"/image: cannot read image {checkpoint / 'corrupt.png'}" in out
    assert asked == [(["<image>\nWhat is this?"], 1),
                     (["<image>\nWhat is this?", "fine", "/etc/hosts?"], 1),  # the old image, the same conversation
                     (["<image>\nAgain?"], 1)]


def test_stage1_checkpoint_answers_with_the_base_llm(checkpoint, capsys, tmp_path):
    """A projector-only directory (pretrain.py's output): the LLM and its tokenizer come from the config's path."""
    model = checkpoints.load(str(checkpoint / "model"))
    model.config.template = "plain"
    checkpoints.save(model, tmp_path, modules=("multi_modal_projector",))
    assert not (tmp_path / "tokenizer.json").exists()
    out = cli(capsys, "--model", str(tmp_path), "--image", str(checkpoint / "red.png"), "--temperature", "0",
              "--max-new-tokens", "5", "ignored by plain")
    model, fmt, processor = generate.load(str(checkpoint / "model"))  # the same weights, all in one directory
    fmt = data.ChatFormat(fmt.tokenizer, "plain", model.num_image_tokens)
    pixel_values = generate.prepare_images([str(checkpoint / "red.png")], processor, "pad")
    expected = generate.answer(model, fmt, [[{"role": "user", "content": "<image>\nignored by plain"}]], pixel_values,
                               max_new_tokens=5)[0]
    assert out == expected + "\n"


def test_left_padding_positions_with_absolute_position_embeddings(tmp_path):
    """With RoPE (Llama) a constant position offset changes nothing; GPT-2's learned positions show whether left
    padding gets each row its own positions. Also: any causal LM works, not only Llama."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vision, _ = save_tiny_backbones(str(tmp_path))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=48, n_layer=2, n_head=4,
                                      tie_word_embeddings=False))
    with torch.no_grad():  # larger weights than the 0.02 init, or a random GPT-2 just repeats its last token
        for p in gpt2.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    gpt2.save_pretrained(tmp_path / "gpt2")
    model = LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm=str(tmp_path / "gpt2"))).eval()
    batch, _ = prompts(model.num_image_tokens, seed=5)
    pixel_values = torch.randn(3, 3, 16, 16)
    together = generate.generate(model, batch, pixel_values, max_new_tokens=8)
    images = [None, pixel_values[:1], pixel_values[1:]]
    assert together == [generate.generate(model, [p], im, max_new_tokens=8)[0] for p, im in zip(batch, images)]


def test_a_conversation_too_long_for_the_context_is_said_and_the_chat_goes_on(checkpoint, capsys, monkeypatch,
                                                                              keyboard):
    """The question that does not fit is dropped from the conversation, which goes on."""
    keyboard(["word " * 300, "Short?"])
    asked, answer = [], generate.answer

    def recorded(model, fmt, conversations, *args, **kwargs):
        asked.append([m["content"] for m in conversations[0]])
        return answer(model, fmt, conversations, *args, **kwargs)

    monkeypatch.setattr(generate, "answer", recorded)
    out = cli(capsys, "--model", str(checkpoint / "model"), "--chat", "--temperature", "0", "--max-new-tokens", "2")
    assert "does not fit the LLM's context of 256" in out and "/reset" in out
    assert len(asked) == 2 and asked[1] == ["Short?"]


def test_a_stop_string_of_several_tokens_is_cut_whole(llama_tok):
    """llava_v0 stops at "###", which a tokenizer may write as several tokens: none of them is left in the reply."""
    from generate import stop_strings_for, trim_at_stop

    ids = llama_tok("It is red.\n### Human: and", add_special_tokens=False).input_ids
    stops = stop_strings_for("llava_v0")
    assert len(llama_tok("###", add_special_tokens=False).input_ids) > 1
    assert llama_tok.decode(trim_at_stop(ids, stops, llama_tok)).rstrip() == "It is red."
    assert trim_at_stop(ids, stop_strings_for("vicuna_v1"), llama_tok) == ids
