"""Serve a model folder with vLLM (the parscale plugin loaded) and compare it with parscale's own model on the
same prompts: greedy tokens, prompt log-probs, what vLLM reads back. Exits 1 on any difference.

Prompt log-probs are compared with a float64 run of parscale's model (the oracle): vLLM's error may be up to
`--tolerance` or up to 4x parscale's own fp32 error, whichever is larger. The second bound is for
ill-conditioned models, e.g. a pretrained model with freshly added streams, whose fp32 log-probs move by
~1e-3 between two correct implementations (parscale's own fp32 and fp64 differ that much).

    python scripts/vllm_parity.py runs/smollm2-p4 --chat --new 24 --dtype float32

Run it in an environment with vLLM (e.g. the one the README's vLLM test command makes). Prompts are chat
turns rendered with the folder's template (--chat) or plain text; the log-prob tolerance is for fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

PROMPTS = ["Write a Python function that squares x.", "What is the capital of France?",
           "List three prime numbers.", "def fibonacci(n):"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--chat", action="store_true", help="render each prompt as a user turn in the folder's template")
    ap.add_argument("--new", type=int, default=24, help="tokens to generate per prompt")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest prompt log-prob difference allowed")
    args = ap.parse_args()

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import parscale

    tok = parscale.load_tokenizer(args.folder)
    texts = [parscale.apply_chat_template(args.folder, [{"role": "user", "content": p}]) if args.chat else p
             for p in PROMPTS]
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    model = parscale.load(args.folder, dtype=args.dtype)
    t0 = time.time()
    oracle = parscale.load(args.folder, dtype="float32").to(torch.float64)
    expected, scores, exact = [], [], []
    for row in ids:
        expected.append(parscale.generate(model, torch.tensor([row]), max_new_tokens=args.new,
                                          generation_config={})[0].tolist())
        for target, net in ((scores, model), (exact, oracle)):
            with torch.no_grad():
                lp = net(torch.tensor([row])).double().log_softmax(-1)[0]
            target.append([float(lp[i - 1, row[i]]) for i in range(1, len(row))])
    parscale_s = time.time() - t0
    llm = LLM(args.folder, dtype=args.dtype, enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=1024,
              seed=0)
    t0 = time.time()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=row) for row in ids],
                           SamplingParams(max_tokens=args.new, temperature=0, prompt_logprobs=0, ignore_eos=True))
    vllm_s = time.time() - t0
    report, ok = [], True
    for row, want, score, oracle_score, out in zip(ids, expected, scores, exact, outputs, strict=True):
        got = list(out.outputs[0].token_ids)
        theirs = [out.prompt_logprobs[i][row[i]].logprob for i in range(1, len(row))]
        vllm_error = max(abs(a - b) for a, b in zip(theirs, oracle_score, strict=True))
        own_error = max(abs(a - b) for a, b in zip(score, oracle_score, strict=True))
        same = (got == want and out.prompt_token_ids == row and out.prompt_logprobs[0] is None
                and vllm_error <= max(args.tolerance, 4 * own_error))
        ok &= same
        report.append({"prompt_tokens": len(row), "tokens_equal": got == want, "first_difference":
                       next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None),
                       "vllm_fp32_vs_fp64": vllm_error, "parscale_fp32_vs_fp64": own_error, "text": tok.decode(got)})
    print(json.dumps({"folder": args.folder, "dtype": args.dtype, "equal": ok, "parscale_s": round(parscale_s, 1),
                      "vllm_s": round(vllm_s, 1), "prompts": report}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
