"""Tiny backbones built offline from configs: a CLIP vision tower, a Llama, and two small trained tokenizers.

Used by the tests and by tools/show_sample.py; they are ordinary transformers directories (config.json, weights,
tokenizer and image-processor files, as save_pretrained writes them), loaded by model.py and data.py exactly like real
ones. Nothing is downloaded: the tokenizers are trained here on a few sentences, the models' weights are random.
"""

import json
import os

import torch

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "What is in the image? A cat on a mat. What color is it? It is orange.",
    "Describe the picture. There is a red circle and a blue square on the left.",
    "How many shapes are there? Two. Is there a triangle? No, there is not.",
    "[INST] <<SYS>> You are a helpful language and vision assistant. <</SYS>> [/INST]",
    "Answer the question using a single word or phrase.",
]

# No "USER"/"ASSISTANT" above: like Llama's vocabulary, this one then tokenizes "USER" after "</s>" with one token
# fewer than at the start of a string, which LLaVA's original label algorithm (tests/test_data.py) relies on.

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llama_tokenizer(vocab_size=600, corpus=CORPUS):
    """Llama-style: SentencePiece-like BPE (Metaspace "▁" dummy prefix, byte fallback), BOS <s>, EOS </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"] + [f"<0x{i:02X}>" for i in range(256)]
    # show_progress=False: the trainer's bars print only blank lines when the output is not a terminal
    tok.train_from_iterator(list(corpus) * 20, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                   show_progress=False))
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return LlamaTokenizerFast(vocab=tok.get_vocab(), merges=merges, unk_token="<unk>", bos_token="<s>",
                              eos_token="</s>", add_bos_token=True, padding_side="right")


def chatml_tokenizer(vocab_size=400):
    """Byte-level BPE (GPT-2/Qwen style), no BOS, a ChatML chat template ending turns with <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 padding_side="right")
    hf.chat_template = CHATML
    return hf


def bert_tokenizer(corpus=CORPUS, extra=()):
    """BERT-style (the Q-Former's, as bert-base-uncased): WordPiece over lower-cased words, [CLS] ... [SEP], [PAD] 0.
    The vocabulary holds the corpus's words (and `extra` texts'), and every letter and digit alone and as "##x", so
    that any text tokenizes without [UNK]."""
    import re
    import string
    import tempfile

    from transformers import BertTokenizerFast

    words = sorted({w for text in [*corpus, *extra] for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    chars = list(string.ascii_lowercase + string.digits)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(chars + list(string.punctuation) + words)) + \
        [f"##{c}" for c in chars]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.txt"), "w") as f:
            f.write("\n".join(vocab) + "\n")
        return BertTokenizerFast(os.path.join(tmp, "vocab.txt"), do_lower_case=True)


def tiny_clip_vision_config(image_size=16, patch_size=8):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=4)


def tiny_llama_config(vocab_size=640, tie_word_embeddings=False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=tie_word_embeddings)


def save_tiny_backbones(root, vision_config=None, llama_config=None, tokenizer=None, seed=0):
    """A CLIP vision tower (+ image processor) and a Llama (+ tokenizer) as ordinary transformers directories."""
    from transformers import CLIPImageProcessorPil, CLIPVisionModel, LlamaForCausalLM

    torch.manual_seed(seed)
    vision_config = vision_config or tiny_clip_vision_config()
    vision_dir, llm_dir = os.path.join(root, "vision"), os.path.join(root, "llm")
    CLIPVisionModel(vision_config).save_pretrained(vision_dir)
    side = vision_config.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor.save_pretrained(vision_dir)
    LlamaForCausalLM(llama_config or tiny_llama_config()).save_pretrained(llm_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(llm_dir)
    return vision_dir, llm_dir


def save_tiny_checkpoint(root):
    """A checkpoint laid out as finetune.py writes one (projector + LLM weights, the tokenizer; the tower referenced by
    path), on tiny random backbones saved next to it. Returns its directory."""
    import checkpoints
    from model import LlavaConfig, LlavaModel

    tokenizer = llama_tokenizer()
    vision, llm = save_tiny_backbones(str(root), tokenizer=tokenizer)
    out = os.path.join(str(root), "model")
    checkpoints.save(LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm=llm)), out,
                     modules=("multi_modal_projector", "language_model"))
    tokenizer.save_pretrained(out)
    return out
