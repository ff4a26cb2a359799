"""Model-level figures for one model, kvloom beside HF transformers in the same run:
load time, prefill tokens/s for one prompt, single-stream greedy decode tokens/s.

    .venv/bin/python -m kvloom.tools.bench_model [--model PATH] [--prompt-tokens 512] [--decode-tokens 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kvloom.tools.machine import best_of
from kvloom.tools.peers import load_hf
from kvloom.tools.workload import prompt_id_range, random_prompts


def bench_kvloom(model, prompt, num_decode, repeats):
    from kvloom.engine.models.loader import load_model
    from kvloom.engine.offline import StaticBatch

    t0 = time.perf_counter()
    _, cfg, params = load_model(model)
    load_s = time.perf_counter() - t0
    max_len = len(prompt) + num_decode + 1

    batch = StaticBatch(cfg, params, num_seqs=1, max_len=max_len, page_size=16)

    def prefill():  # as serving does it: logits of the last prompt token only
        batch.reset()  # the same compiled step each time (a new StaticBatch would trace and compile again)
        return batch.extend([prompt], last_only=True)

    prefill()  # compile
    prefill_s = best_of(prefill, repeats)

    token = int(prefill()[-1].argmax())
    batch.extend([[token]])  # compile the decode shape
    t0 = time.perf_counter()
    for _ in range(num_decode):
        token = int(batch.extend([[token]])[0].argmax())
    decode_s = time.perf_counter() - t0
    return dict(load_s=load_s, prefill_tok_s=len(prompt) / prefill_s, decode_tok_s=num_decode / decode_s)


def bench_hf(model, prompt, num_decode, repeats):
    import torch

    from kvloom.engine.models.loader import resolve_source

    t0 = time.perf_counter()
    hf = load_hf(resolve_source(model))
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hf(ids, logits_to_keep=1)
        prefill_s = best_of(lambda: hf(ids, logits_to_keep=1), repeats)  # last-token logits, as generate does
        gen = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)
        hf.generate(ids, max_new_tokens=2, **gen)
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=num_decode + 1, min_new_tokens=num_decode + 1, **gen)
        total = time.perf_counter() - t0
    # generate = one prefill + num_decode decode steps
    decode_s = max(total - prefill_s, 1e-9)
    return dict(load_s=load_s, prefill_tok_s=len(prompt) / prefill_s, decode_tok_s=num_decode / decode_s)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    prompt = random_prompts(np.random.default_rng(0), 1, args.prompt_tokens, prompt_id_range(None))[0]
    ours = bench_kvloom(args.model, prompt, args.decode_tokens, args.repeats)
    theirs = bench_hf(args.model, prompt, args.decode_tokens, args.repeats)
    print(f"{'figure':<28}{'kvloom':>12}{'transformers':>14}{'ratio':>9}")
    for key, label in (("load_s", "load time (s)"),
                       ("prefill_tok_s", f"prefill {args.prompt_tokens} tok/s"),
                       ("decode_tok_s", "single-stream decode tok/s")):
        print(f"{label:<28}{ours[key]:>12.2f}{theirs[key]:>14.2f}{ours[key] / theirs[key]:>9.2f}")


if __name__ == "__main__":
    main()
