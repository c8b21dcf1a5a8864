"""Generation speed: our decoding loop against transformers' LlavaForConditionalGeneration.generate, same weights.

    python tools/bench_generate.py                              # tiny LLaVA-shaped model on CPU
    python tools/bench_generate.py --size 7b --dtype bfloat16   # on a GPU: 7B-shaped (Vicuna-7B + CLIP-L/14-336)

Random weights with the real shapes; batch 1; a prompt of one image + `--text-tokens` text tokens; greedy; EOS
ignored so both write exactly --new-tokens tokens. Reports time to first token (prefill + first token), decode
tokens/s (the tokens after the first), the ratios of ours to transformers', and on a GPU the fraction of the
memory-bandwidth roofline (each token reads the LLM's weights and the KV cache once, so tokens/s can reach at most
bandwidth / those bytes). Median of --repeats runs after a warm-up, and the rate of the fastest runs (the least
disturbed on a shared machine); the runs interleaved, a round of each per repeat, so that a load falls on all alike.

    python tools/bench_generate.py --compile --hf-compile --repeats 5   # also both compiled decoders
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# HBM bandwidth (docs/performance.md section 1), matched against the device name in this order: the PCIe and NVL
# H100s before the SXM one, as train.py's peak FLOPs are.
BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.039e12,
             "A100-SXM4-40GB": 1.555e12}
TINY_LLM = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4)
TINY_CLIP = dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4)


def build(size, dtype, device):
    """transformers' Llava with random weights, and ours sharing its modules (one copy of the weights). 7b / 13b:
    the real backbones' configs (tools/real_configs/)."""
    from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from checkpoints import from_transformers_llava
    from tools.memory import CLIP_L_336, LLMS

    if size in LLMS:
        text, vision = AutoConfig.from_pretrained(LLMS[size]), AutoConfig.from_pretrained(CLIP_L_336).vision_config
    else:
        text = LlamaConfig(vocab_size=32000, num_key_value_heads=4, max_position_embeddings=4096,
                           tie_word_embeddings=False, **TINY_LLM)
        vision = CLIPVisionConfig(**TINY_CLIP)
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999))
    hf = hf.to(dtype).eval()
    return hf, from_transformers_llava(hf, f"random {size}").eval()  # (the source only names it in errors)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None):
    from transformers import CompileConfig

    import generate
    from data import IMAGE_TOKEN_INDEX

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "7b", "13b"], default="tiny")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time generate.py --compile (compiles first)")
    p.add_argument("--hf-compile", action="store_true",
                   help="also time transformers' generate with cache_implementation='static', compiled")
    p.add_argument("--json", help="write the numbers here too")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)

    hf, ours = build(args.size, dtype, device)
    n_image = ours.num_image_tokens
    side = hf.config.vision_config.image_size
    text = torch.randint(3, 31000, (args.text_tokens,)).tolist()
    prompt = [1] + [IMAGE_TOKEN_INDEX] * n_image + text
    hf_ids = torch.tensor([[31999 if t == IMAGE_TOKEN_INDEX else t for t in prompt]], device=device)
    pixel_values = torch.randn(1, 3, side, side, device=device, dtype=dtype)

    def run_ours(n, decoder=None):
        return lambda: generate.generate(ours, [prompt], pixel_values, max_new_tokens=n, decoder=decoder)

    def run_hf(n, **kw):
        return lambda: hf.generate(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=pixel_values,
                                   max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)

    # transformers' own compiled decoding: a static cache, and its forward compiled (on a GPU by itself; on a CPU
    # only when its compile config allows every device)
    hf_compile = CompileConfig()
    hf_compile._compile_all_devices = True

    with torch.no_grad():
        assert generate.generate(ours, [prompt], pixel_values, max_new_tokens=8)[0] == \
            run_hf(8)()[0, len(prompt):].tolist(), "the two disagree on greedy tokens"
        results, best = {}, {}
        runs = [("ours", run_ours), ("transformers generate", run_hf)]
        if args.compile:
            static = generate.StaticDecoder(ours)  # one for all runs: it compiles once
            runs.append(("ours --compile", lambda n: run_ours(n, static)))
        if args.hf_compile:
            runs.append(("transformers static+compile",
                         lambda n: run_hf(n, cache_implementation="static", compile_config=hf_compile)))
        for name, make in runs:
            make(args.new_tokens)(), make(1)()  # warm-up (and compilation)
        # Interleaved, a round of every run per repeat: on a shared machine the load then falls on all of them alike
        times = {name: ([], []) for name, _ in runs}
        for _ in range(args.repeats):
            for name, make in runs:
                times[name][0].append(timed(make(1), device))
                times[name][1].append(timed(make(args.new_tokens), device))
        for name, (firsts, fulls) in times.items():
            first, full = statistics.median(firsts), statistics.median(fulls)
            results[name] = (first, (args.new_tokens - 1) / (full - first))
            best[name] = (args.new_tokens - 1) / (min(fulls) - min(firsts))  # the least disturbed runs

    llm_bytes = sum(p.numel() * p.element_size() for p in ours.language_model.parameters()) + \
        sum(p.numel() * p.element_size() for p in ours.multi_modal_projector.parameters())
    cfg = ours.language_model.config
    context = len(prompt) + args.new_tokens // 2
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.hidden_size * context * torch.finfo(dtype).bits // 8
    bandwidth = next((v for k, v in BANDWIDTH.items() if device.type == "cuda" and k in torch.cuda.get_device_name()),
                     None)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.size} LLaVA-shaped, {args.dtype}, {where}; batch 1, prompt {len(prompt)} tokens "
          f"({n_image} image), {args.new_tokens} new tokens, median of {args.repeats}")
    for name, (ttft, rate) in results.items():
        roofline = f", {rate * (llm_bytes + kv_bytes) / bandwidth:.0%} of the bandwidth roofline" if bandwidth else ""
        print(f"  {name:<28} time to first token {ttft * 1000:8.1f} ms   decode {rate:8.1f} tokens/s (best runs "
              f"{best[name]:.1f}){roofline}")
    pairs = [(name, "transformers generate") for name in results if name.startswith("ours")]
    if "ours --compile" in results and "transformers static+compile" in results:
        pairs.append(("ours --compile", "transformers static+compile"))
    for name, baseline in pairs:
        print(f"  {name} / {baseline}: decode {results[name][1] / results[baseline][1]:.2f}x (best runs "
              f"{best[name] / best[baseline]:.2f}x), TTFT {results[baseline][0] / results[name][0]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "size": args.size, "dtype": args.dtype, "prompt_tokens": len(prompt),
                       "new_tokens": args.new_tokens, "repeats": args.repeats,
                       "runs": {name: {"ttft_ms": ttft * 1000, "decode_tokens_per_s": rate,
                                       "decode_tokens_per_s_best_runs": best[name],
                                       "roofline": rate * (llm_bytes + kv_bytes) / bandwidth if bandwidth else None}
                                for name, (ttft, rate) in results.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
