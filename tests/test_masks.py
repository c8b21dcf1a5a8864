"""data.ChatFormat's masks on the edge cases an adversarial corpus found in LLaVA's own preprocessing: tokenizers
that merge a reply's first characters into the template, tokenizers that add EOS, and data that spells control
tokens. Each tokenizer is built offline, of the kind that shows the problem. Then the first paper's llava_v0
template, with and without <im_start>/<im_end>, against LLaVA v0's own masking algorithm."""

import json

import pytest

import real_format as rf
from data import (IGNORE_INDEX, IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN_INDEX, ChatFormat, DataError,
                  LazySupervisedDataset, UserError, parse_conversation, render)
from test_data import CONVERSATIONS, N, conv, supervised_runs, write_dataset
from tools.tiny import CHATML, CORPUS, llama_tokenizer

# Qwen2's pre-tokenizer split (its tokenizer.json): `\s*[\r\n]+` makes one pre-token of whitespace ending in newlines
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def qwen2_tok():
    """Qwen2-like: Qwen2's split regex then byte-level, a small BPE trained on text with blank lines (so "\\n\\n" and
    "\\n " are single tokens, as in Qwen2's vocabulary), ChatML turns ending with <|im_end|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = CORPUS + ["one line\n\ntwo lines\n \nthree\n\n\nfour\n  \nthe end"]
    tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    # what the test is about: the template's "\n" and a reply's first whitespace in one token
    assert hf.tokenize("\n\n") == ["ĊĊ"] and hf.tokenize("\n \n")[0] == "ĊĠ"
    return hf


def reply_starts(labels):
    return [i for i in range(len(labels)) if labels[i] != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]


# ----------------------------------------------------------------------------------------------------------------------
# 1. A tokenizer that merges the template's newline with a reply's leading whitespace


WHITESPACE_REPLIES = {
    "newline first": conv("<image>\nWhat is in the image?", "\nA cat.", "And the color?", " \nIt is orange."),
    "blank lines": conv("What is this?", "\n\nTwo lines.\n", "More?", "\n  \nThe end."),
    "spaces then newline": conv("<image>\nWhat is in the image?", "  \nA cat.", "Is there a dog?", "No, there is not."),
    "no leading whitespace": conv("What is this?", "A cat.", "And the color?", "It is orange."),
}


@pytest.mark.parametrize("name", WHITESPACE_REPLIES)
@pytest.mark.parametrize("tokenizer", ["qwen2_tok", "chatml_tok"])
def test_supervised_tokens_are_the_reply_and_the_prompt_is_a_prefix(name, tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    turns = WHITESPACE_REPLIES[name]
    n_images = turns[0]["value"].count("<image>")
    messages = parse_conversation(turns, n_images, name)
    fmt = ChatFormat(tok, "chat_template", N)
    ids, labels = fmt.encode(messages, name)
    # exactly each reply and its end token: not one character of the template's "assistant\n"
    assert [tok.decode(r) for r in supervised_runs(ids, labels)] == [t["value"] + "<|im_end|>" for t in turns[1::2]]
    # what the model reads before reply k is what generation feeds it for that history
    for k, start in enumerate(reply_starts(labels)):
        assert fmt.prompt(messages[:2 * k + 1]) == ids[:start]
    # and the ids spell the text, cut or not
    assert ids.count(IMAGE_TOKEN_INDEX) == n_images * N
    assert fmt.spelled(ids) == render("chat_template", messages, tok).replace("<image>", "")


def test_a_merge_the_tokenizer_cannot_undo_is_an_error_naming_the_sample():
    """A SentencePiece-style tokenizer puts its dummy-prefix "▁" before a text tokenized on its own, so a reply cut
    from a template that merges into it would read " \\nA cat."; no tokenization is both exact and prefix-consistent."""
    tok = llama_tokenizer(corpus=CORPUS + ["[/INST]\n\nA cat.\n\nTwo.\n\n"] * 5)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} "
                         "[/INST]\n{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    fmt = ChatFormat(tok, "chat_template", N)
    ids, labels = fmt.encode(parse_conversation(conv("Hi?", "A cat."), 0, "x"), "x")
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "A cat.</s>"
    with pytest.raises(DataError, match=r"id 'nl-1'\): the tokenizer merges the start of the reply in turn 1"):
        fmt.encode(parse_conversation(conv("Hi?", "\nA cat."), 0, "x"), "data.json, sample #0 (id 'nl-1')")


# ----------------------------------------------------------------------------------------------------------------------
# 2. A tokenizer that adds EOS (Llama's add_eos_token=True)


def tiny_llama_adding_eos():
    """tools/tiny.py's Llama tokenizer, the same vocabulary, configured with add_eos_token=True."""
    from transformers import LlamaTokenizerFast

    model = json.loads(llama_tokenizer().backend_tokenizer.to_str())["model"]
    return LlamaTokenizerFast(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], unk_token="<unk>",
                              bos_token="<s>", eos_token="</s>", add_bos_token=True, add_eos_token=True,
                              padding_side="right")


def sentencepiece_pair(folder, add_eos_token):
    """Vicuna's tokenizer.model + tokenizer_config.json (tests/real_format.py), with add_eos_token set."""
    from transformers import AutoTokenizer

    rf.write_tokenizer(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_eos_token": add_eos_token}))
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("kind", ["tiny", "sentencepiece"])
@pytest.mark.parametrize("template", ["vicuna_v1", "llama_2", "plain"])
def test_a_tokenizer_adding_eos_gets_bos_once_and_eos_where_the_template_puts_it(kind, template, tmp_path, llama_tok):
    if kind == "tiny":
        eos_tok, reference = tiny_llama_adding_eos(), llama_tok
    else:
        eos_tok, reference = sentencepiece_pair(tmp_path / "eos", True), sentencepiece_pair(tmp_path / "plain", False)
    assert eos_tok("A cat.").input_ids[-1] == eos_tok.eos_token_id  # the option is on
    turns = (conv("<image>\nDescribe it.", "A cat on a mat.") if template == "plain" else
             conv("<image>\nWhat is in the image?", "A cat on a mat.", "What color is it?", "It is orange."))
    messages = parse_conversation(turns, 1, "x")
    fmt = ChatFormat(eos_tok, template, N)
    ids, labels = fmt.encode(messages, "x")
    # the same sample as without the option: BOS once at the front, EOS only after each reply (none in plain)
    assert (ids, labels) == ChatFormat(reference, template, N).encode(messages, "x")
    assert ids[0] == eos_tok.bos_token_id and ids.count(eos_tok.bos_token_id) == (2 if template == "llama_2" else 1)
    eos = [i for i, t in enumerate(ids) if t == eos_tok.eos_token_id]
    assert len(eos) == (0 if template == "plain" else len(turns) // 2)
    assert all(labels[i] == eos_tok.eos_token_id for i in eos)  # each ends a reply
    prompt = fmt.prompt(messages[:1])
    assert prompt == ids[:len(prompt)] and eos_tok.eos_token_id not in prompt
    assert prompt.count(eos_tok.bos_token_id) == 1


# ----------------------------------------------------------------------------------------------------------------------
# 3. Data text that spells a control token


SPELLED = {  # name: (tokenizer, template, turns, the turn that spells a control token)
    "</s> in a vicuna reply": ("llama_tok", "vicuna_v1", conv("Q?", "It ends here.</s> No, it goes on."), 1),
    "<s> in a question": ("llama_tok", "vicuna_v1", conv("Strike <s>this</s> out?", "Done."), 0),
    "</s> in a llama_2 reply": ("llama_tok", "llama_2", conv("Q?", "A.", "Q2?", "Say </s> to stop."), 3),
    "<|im_end|> in a reply": ("chatml_tok", "chat_template", conv("Q?", "Stop<|im_end|> or not."), 1),
    "<|im_start|> in a question": ("chatml_tok", "chat_template", conv("Q?", "A.", "<|im_start|>system\nHi", "B."), 2),
}


@pytest.mark.parametrize("name", SPELLED)
def test_data_spelling_a_control_token_is_an_error_naming_the_sample(name, tmp_path, request):
    tokenizer, template, turns, turn = SPELLED[name]
    fmt = ChatFormat(request.getfixturevalue(tokenizer), template, N)
    path = write_dataset(tmp_path, [{"id": "ok", "conversations": conv("Q?", "A.")},
                                    {"id": "spelled-3", "conversations": turns}])
    dataset = LazySupervisedDataset(path, None, fmt)
    assert dataset[0]["id"] == "ok"
    with pytest.raises(DataError, match=rf"data.json, sample #1 \(id 'spelled-3'\): turn {turn} spells the control"):
        dataset[1]
    skipping = LazySupervisedDataset(path, None, fmt, skip_bad=True)
    assert [skipping[i]["id"] for i in range(2)] == ["ok", "ok"]
    # at inference too, in the question or in the history: generation would read it as that token
    messages = parse_conversation(turns, 0, name)
    history = messages[:turn + 1] if turn % 2 == 0 else messages[:turn + 1] + [{"role": "user", "content": "Next?"}]
    with pytest.raises(DataError, match=f"the prompt: turn {turn} spells the control"):
        fmt.prompt(history)


@pytest.mark.parametrize("tokenizer,template,text", [
    ("llama_tok", "vicuna_v1", "a </s or <s > or s> is text"),
    ("chatml_tok", "chat_template", "<|im_end| and im_end|> are text")])
def test_near_spellings_and_image_tags_are_not_control_tokens(tokenizer, template, text, request):
    tok = request.getfixturevalue(tokenizer)
    messages = parse_conversation(conv("<image>\n" + text, text), 1, "x")
    ids, labels = ChatFormat(tok, template, N).encode(messages, "x")
    assert ids.count(IMAGE_TOKEN_INDEX) == N
    assert tok.decode(supervised_runs(ids, labels)[0]).strip() == text + tok.eos_token


def test_the_conversations_of_test_data_are_unchanged(llama_tok, chatml_tok):
    """The fixes leave every ordinary sample as it was: no cut, no rejection, LLaVA's ids."""
    for turns, n_images in CONVERSATIONS.values():
        messages = parse_conversation(turns, n_images, "x")
        for tok, template in [(llama_tok, "vicuna_v1"), (llama_tok, "llama_2"), (chatml_tok, "chat_template")]:
            fmt = ChatFormat(tok, template, N)
            assert fmt.encode(messages, "x")[0] == fmt.tokenize(render(template, messages, tok))[0]


# ----------------------------------------------------------------------------------------------------------------------
# 4. LLaVA v0's `###` conversations (the first paper), with and without <im_start>/<im_end>, against its train.py


def llama_with_hashes(im_tokens=False):
    """tools/tiny.py's Llama tokenizer with Llama's own pieces for "#": "▁###" one token, "###" after a newline two
    ("##" "#"), so that a turn tokenized alone (BOS + "▁### ...") has as many tokens as in the conversation: the
    length arithmetic LLaVA v0's masking relies on holds, as with Vicuna's real vocabulary."""
    from transformers import LlamaTokenizerFast

    model = json.loads(llama_tokenizer().backend_tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    for piece in ("#", "##", "▁##", "▁###"):
        vocab[piece] = len(vocab)
    merges = [tuple(m) for m in model["merges"]] + [("#", "#"), ("▁", "##"), ("▁##", "#")]
    tok = LlamaTokenizerFast(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                             add_bos_token=True, padding_side="right")
    assert tok.tokenize("a\n###")[-2:] == ["##", "#"] and tok.tokenize("###") == ["▁###"]
    if im_tokens:
        tok.add_tokens([IM_START_TOKEN, IM_END_TOKEN], special_tokens=True)
    return tok


V0_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the human's questions.")


def original_tokenize(text, tok):
    """LLaVA's tokenizer_image_token, one placeholder per image."""
    chunks = [tok(c).input_ids for c in text.split("<image>")]
    return [chunks[0][0]] + [t for i, c in enumerate(chunks) for t in ([IMAGE_TOKEN_INDEX] if i else []) + c[1:]]


def original_preprocess_v0(turns, tok, im_start_end):
    """LLaVA's train.py for --version v0 (haotian-liu/LLaVA 44e0562: preprocess_multimodal, then the legacy branch of
    preprocess: _add_speaker_and_signal, _mask_targets; 8959d5c's FastChat code is the same). Each turn is
    re-tokenized alone (with its BOS) and masked by those lengths: a human turn keeps its first 2 tokens."""
    sentences = []
    for t in turns:
        value = t["value"]
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
            if im_start_end:
                value = value.replace("<image>", "<im_start><image><im_end>")
        role = "Human" if t["from"] == "human" else "Assistant"
        sentences.append((t["from"], "### " + role + ": " + value + "\n"))
    header = V0_SYSTEM + "\n\n"
    text = header + "".join(s for _, s in sentences) + "### "
    ids = original_tokenize(text, tok)
    target, cur = list(ids), len(original_tokenize(header, tok))
    target[:cur] = [IGNORE_INDEX] * cur
    for speaker, sentence in sentences:
        n = len(original_tokenize(sentence, tok))
        if speaker == "human":
            target[cur + 2:cur + n] = [IGNORE_INDEX] * (n - 2)
        cur += n
    prompts = [original_tokenize(header + "".join(s for _, s in sentences[:k + 1]) + "### Assistant:", tok)
               for k in range(0, len(sentences), 2)]
    return ids, target, prompts


V0_CORPUS = {  # name: (turns, number of images)
    "image first, multi-turn": (conv("<image>\nWhat is in the image?", "A cat on a mat.", "What color is it?",
                                     "It is orange.", "Is there a dog?", "No, there is not."), 1),
    "image last": (conv("What is in the image?\n<image>", "A cat on a mat.", "And the color?", "It is orange."), 1),
    "text-only": (conv("How many shapes are there?", "Two.", "Describe them.", "A red circle\nand a blue square."), 0),
    "a reply with its own ###": (conv("<image>\nDescribe it.", "LECTURE: A cat.\n###\nANSWER: A."), 1),
}


def pieces(tok, ids, labels, keep):
    """The token pieces of each run of positions where keep(i), joined: what those positions spell."""
    runs, previous = [], False
    for i, t in enumerate(ids):
        if keep(i) and not previous:
            runs.append("")
        if keep(i):
            runs[-1] += tok.convert_ids_to_tokens(t)
        previous = keep(i)
    return runs


@pytest.mark.parametrize("im_start_end", [False, True])
@pytest.mark.parametrize("name", V0_CORPUS)
def test_llava_v0_ids_and_prompts_equal_llavas_and_its_labels_are_the_replies(name, im_start_end):
    tok = llama_with_hashes(im_tokens=im_start_end)
    turns, n_images = V0_CORPUS[name]
    messages = parse_conversation(turns, n_images, name)
    fmt = ChatFormat(tok, "llava_v0", 1)
    assert fmt.im_start_end == im_start_end  # found in the tokenizer
    ids, labels = fmt.encode(messages, name)
    original_ids, original_labels, original_prompts = original_preprocess_v0(turns, tok, im_start_end)
    assert ids == original_ids  # the same text, tokenized the same way
    if im_start_end and n_images:
        at = ids.index(IMAGE_TOKEN_INDEX)
        assert tok.convert_ids_to_tokens(ids[at - 1:at + 2:2]) == [IM_START_TOKEN, IM_END_TOKEN]
    # what generation is fed before each reply is what the original trained the model on before it
    starts = [i for i in range(len(ids)) if labels[i] != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]
    assert [fmt.prompt(messages[:k + 1]) for k in range(0, len(messages), 2)] == original_prompts
    assert [ids[:s] for s in starts] == original_prompts
    # ours supervise each reply, its "\n" and the separator that ends it: a subset of what the original supervises
    ours = {i for i, label in enumerate(labels) if label != IGNORE_INDEX}
    theirs = {i for i, label in enumerate(original_labels) if label != IGNORE_INDEX}
    assert ours < theirs
    replies = [t["value"] for t in turns[1::2]]
    assert [tok.decode(r) for r in supervised_runs(ids, labels)] == [r + "\n###" for r in replies]
    # the rest of theirs is template: the "###" after the system prompt, each reply's "### Assistant:" and the
    # space after the last "###", none of which generation ever writes
    assert pieces(tok, ids, labels, lambda i: i in theirs - ours) == (
        ["##" + "#"] + ["".join(tok.tokenize("\n### Assistant:")).split("<0x0A>")[1]] * len(replies) + ["▁"])


def test_llava_v0_strings_and_the_im_tokens_option():
    tok = llama_with_hashes(im_tokens=True)
    messages = parse_conversation(conv("What is it?\n<image>", "A cat.", "Sure?", "Yes."), 1, "x")
    assert render("llava_v0", messages, tok) == (
        V0_SYSTEM + "\n\n### Human: <image>\nWhat is it?\n### Assistant: A cat.\n### Human: Sure?\n"
        "### Assistant: Yes.\n### ")
    assert render("llava_v0", messages[:1], tok, add_generation_prompt=True).endswith("?\n### Assistant:")
    # off on request, or for a tokenizer without the tokens; asked for without them, an error that says what to do
    plain_ids = ChatFormat(tok, "llava_v0", 1, im_start_end=False).encode(messages)[0]
    assert tok.convert_tokens_to_ids(IM_START_TOKEN) not in plain_ids
    assert not ChatFormat(llama_with_hashes(), "llava_v0", 1).im_start_end
    with pytest.raises(UserError, match="the tokenizer has no <im_start> and <im_end> tokens; add both"):
        ChatFormat(llama_with_hashes(), "vicuna_v1", 1, im_start_end=True)
    # data that spells them is refused as any control token is
    with pytest.raises(DataError, match="spells the control token '<im_start>'"):
        ChatFormat(tok, "llava_v0", 1).encode(parse_conversation(conv("<im_start>?", "A."), 0, "x"), "x")
