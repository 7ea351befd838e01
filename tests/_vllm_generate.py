"""Greedy generation with vLLM's offline ``LLM`` for tests/test_vllm.py, run as a subprocess.

vLLM starts its engine in spawned processes, which re-import the main module: the entry point
therefore sits under ``if __name__ == "__main__"``, in a script of its own rather than in pytest.

    python _vllm_generate.py '{"folders": [...], "prompts": [[ids], ...], "max_tokens": 8,
                               "dtype": "float32", "tensor_parallel_size": 1}'

prints one line ``RESULT {"<folder>": [[token ids per prompt], ...], ...}``.
"""

from __future__ import annotations

import gc
import json
import sys


def main(args: dict) -> dict:
    from vllm import LLM, SamplingParams

    params = SamplingParams(max_tokens=args["max_tokens"], temperature=0.0)
    results = {}
    for folder in args["folders"]:
        llm = LLM(model=folder, dtype=args.get("dtype", "float32"), enforce_eager=True,
                  max_model_len=128, max_num_seqs=len(args["prompts"]), seed=0,
                  tensor_parallel_size=args.get("tensor_parallel_size", 1))
        outputs = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], params)
        results[folder] = [list(o.outputs[0].token_ids) for o in outputs]
        del llm
        gc.collect()
    return results


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
