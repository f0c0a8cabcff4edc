"""Engine check on the GPU: greedy tokens with CUDA graphs on equal those with graphs off.

    python -m infer.benchmarks.engine_graphs [--shape 0.6b] [--prompts 32] [--steps 64]

A Qwen3-shaped model with random bf16 weights is saved (with a word-level tokenizer) to a temp
folder, then generated from twice by `LLM`: `enforce_eager=True` (compiled, no graphs) and with
piecewise CUDA graphs. Prints both token/s figures and whether every prompt's tokens agree.
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time

import torch

from ..runtime.engine.llm import LLM
from ..runtime.engine.sampling import SamplingParams
from .decode_step import qwen3_config
from .hf_baselines import save_checkpoint


def run(folder: str, prompts: list[list[int]], steps: int, **kwargs) -> tuple[list[list[int]], float, object]:
    llm = LLM(folder, dtype="bfloat16", max_model_len=1024, max_num_seqs=len(prompts),
              gpu_memory_utilization=0.45, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [o.token_ids for o in outputs]
    return tokens, sum(map(len, tokens)) / seconds, llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="0.6b")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--inner-compiler", default="eager")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (int(n),), generator=gen).tolist()
               for n in torch.randint(8, 200, (args.prompts,), generator=gen)]
    options = {"inner_compiler": args.inner_compiler}
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(qwen3_config(args.shape), folder, "cuda")
        results = {}
        for name, extra in (("graphs off", dict(enforce_eager=True)), ("piecewise graphs", {}),
                            ("full decode graphs", dict(cudagraph_mode="full"))):
            mode_options = dict(options, **({"cudagraph_mode": "full"} if "cudagraph_mode" in extra else {}))
            kwargs = {k: v for k, v in extra.items() if k != "cudagraph_mode"}
            tokens, tps, llm = run(folder, prompts, args.steps, compile_options=mode_options, **kwargs)
            results[name] = (tokens, tps, llm.capture_seconds)
            del llm
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
    reference = results["graphs off"][0]
    for name, (tokens, tps, capture) in results.items():
        same = sum(a == b for a, b in zip(reference, tokens))
        print(f"{args.shape}, {args.prompts} prompts x {args.steps} greedy tokens, {name}: {tps:.0f} tok/s, "
              f"capture {capture:.1f}s, tokens identical to graphs-off for {same}/{len(prompts)} prompts")


if __name__ == "__main__":
    main()
